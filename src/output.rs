//! The output file: where it may go, the temporary file it is built in, and its atomic publish.
//!
//! Invariant: the output path shows either nothing (or the earlier file, untouched) or the
//! complete, verified bytes. The bytes are built in a hidden temporary file in the output's own
//! folder, created new (`O_EXCL`, never an existing file truncated) and allocated up front with
//! `fallocate`, so a full disk is [`OutputError::NoSpace`] before any byte is written and a write
//! through a memory map can never hit SIGBUS for want of blocks. Publishing is `fsync` of the file,
//! `renameat2` (with `RENAME_NOREPLACE` unless overwriting, so a file that appeared meanwhile is
//! never clobbered), then `fsync` of the folder. The `.b3` sidecar is written to its own temporary
//! file *before* the output is renamed, so a full disk cannot leave an output without its sidecar.
//! Dropping a [`TempOutput`] removes its temporary names: its own bytes when unpublished, the
//! earlier file an overwrite exchanged out when published.
//!
//! Temporary names are `.concatd-<job id>.tmp` (and `.concatd-<job id>.b3.tmp`), so whoever knows a
//! job's id — the daemon recovering after a crash — can find and remove them.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

/// Why the output cannot be written or published.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output '{output}' is not allowed: {reason}")]
    NotAllowed { output: String, reason: String },
    #[error("output {} already exists (set overwrite to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("no space for output {} ({action}): {source}", path.display())]
    NoSpace {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("output {} ({action}): {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

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
    b3.push(".b3");
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
    /// Check `output` (relative, no `..`, not hidden in our temp-name space) and create its
    /// parent folders beneath `root`, refusing any symlink on the way.
    pub fn new(root: &Path, output: &str) -> Result<Self, OutputError> {
        let refuse = |reason: &str| OutputError::NotAllowed {
            output: output.to_owned(),
            reason: reason.to_owned(),
        };
        let rel = Path::new(output);
        if output.is_empty() || output.ends_with('/') {
            return Err(refuse("it must name a file"));
        }
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(refuse("`..` may not appear in it")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("it must be relative to the rule's output_root"));
                }
            }
        }
        let name = parts.pop().ok_or_else(|| refuse("it must name a file"))?;
        if name.as_bytes().starts_with(b".concatd-") {
            return Err(refuse("names starting with .concatd- are reserved"));
        }
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
            let created = match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(io("creating parent folder", e)),
            };
            let child = rustix::fs::openat2(
                &dir,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR | Errno::XDEV => OutputError::NotAllowed {
                    output: output.to_owned(),
                    reason: format!("{} is a symlink or not a folder", path.display()),
                },
                e => io("opening parent folder", e),
            })?;
            let parent = std::mem::replace(&mut dir, child);
            if created {
                created_in.push(parent);
            }
        }
        path.push(name);
        Ok(Self {
            dir,
            name: name.to_owned(),
            path,
            created_in,
        })
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

    /// Create the temporary file for job `job_id` and allocate `size` bytes for it.
    pub fn create_temp(&self, job_id: &str, size: u64) -> Result<TempOutput<'_>, OutputError> {
        let name = temp_name(job_id);
        let fd = rustix::fs::openat(
            &self.dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| self.fail("creating temporary file", e))?;
        let temp = TempOutput {
            target: self,
            job_id: job_id.to_owned(),
            file: File::from(fd),
            allocated: false,
            keep: false,
        };
        temp.allocate(size)
    }

    /// The temporary file an earlier run of job `job_id` left (a crash, or a shutdown that kept
    /// it for resuming), opened again and allocated to `size`; `None` when there is none. The
    /// caller checks it is the very file it recorded (its inode) before trusting its bytes, and
    /// drops it (which removes it) otherwise.
    pub fn reopen_temp(
        &self,
        job_id: &str,
        size: u64,
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
        let temp = TempOutput {
            target: self,
            job_id: job_id.to_owned(),
            file: File::from(fd),
            allocated: false,
            keep: false,
        };
        let st =
            rustix::fs::fstat(&temp.file).map_err(|e| self.fail("opening temporary file", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != size
        {
            return Ok(None); // dropped: removed
        }
        temp.allocate(size).map(Some)
    }
}

impl<'a> TempOutput<'a> {
    fn allocate(self, size: u64) -> Result<TempOutput<'a>, OutputError> {
        let mut temp = self;
        let target = temp.target;
        if size > 0 {
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

/// An I/O failure on the output at `path`: [`OutputError::NoSpace`] when the disk is full.
pub fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> OutputError {
    let path = path.to_owned();
    if is_no_space(&source) {
        OutputError::NoSpace {
            path,
            action,
            source,
        }
    } else {
        OutputError::Io {
            path,
            action,
            source,
        }
    }
}

/// True for the errors that mean "the filesystem is full" (or the file too big for it).
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG)
    )
}

/// How to publish.
#[derive(Debug, Clone, Copy)]
pub struct Publish {
    pub overwrite: bool,
    pub fsync: bool,
    /// Also publish `<output>.b3`.
    pub sidecar: bool,
}

/// The output being built. Its temporary names are removed on drop.
pub struct TempOutput<'a> {
    target: &'a OutputTarget,
    job_id: String,
    file: File,
    allocated: bool,
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

    /// Make the output durable and visible at its path, with its sidecar.
    pub fn publish(self, hash: &blake3::Hash, how: Publish) -> Result<PathBuf, OutputError> {
        let t = self.target;
        if how.fsync {
            self.file
                .sync_all()
                .map_err(|e| t.fail_io("syncing temporary file", e))?;
        }
        let sidecar_temp = sidecar_temp_name(&self.job_id);
        if how.sidecar {
            let line = crate::checksum::sidecar_line(hash, &t.name.to_string_lossy());
            self.write_sidecar_temp(&sidecar_temp, line.as_bytes(), how.fsync)?;
        }
        let output_temp = temp_name(&self.job_id);
        let replaced = match t.place(&output_temp, &t.name, how.overwrite) {
            Ok(replaced) => replaced,
            Err(Errno::EXIST) => {
                return Err(OutputError::Exists {
                    path: t.path.clone(),
                });
            }
            Err(e) => return Err(t.fail("publishing (rename)", e)),
        };
        // Past the rename the output is visible. Should the rest fail, everything is put back as
        // it was — the earlier file (kept under the temporary name by the exchange) returns, or
        // the new output goes — so a failed job never leaves an output behind nor loses one.
        let b3 = sidecar_name(&t.name);
        let mut sidecar = None; // Some(whether an earlier .b3 was replaced)
        let mut finish = || -> Result<(), OutputError> {
            if how.sidecar {
                match t.place(&sidecar_temp, &b3, how.overwrite) {
                    Ok(replaced) => sidecar = Some(replaced),
                    Err(Errno::EXIST) => {
                        return Err(OutputError::Exists {
                            path: t.path.with_file_name(&b3),
                        });
                    }
                    Err(e) => return Err(t.fail("publishing the .b3 sidecar", e)),
                }
            }
            if how.fsync {
                // The output's folder, and every folder this job created on the way to it.
                for dir in std::iter::once(&t.dir).chain(t.created_in.iter().rev()) {
                    rustix::fs::fsync(dir).map_err(|e| t.fail("syncing the output folder", e))?;
                }
            }
            Ok(())
        };
        if let Err(e) = finish() {
            if let Some(replaced) = sidecar {
                t.unplace(&sidecar_temp, &b3, replaced);
            }
            t.unplace(&output_temp, &t.name, replaced);
            return Err(e);
        }
        Ok(t.path.clone())
    }

    fn write_sidecar_temp(&self, name: &str, bytes: &[u8], fsync: bool) -> Result<(), OutputError> {
        let t = self.target;
        let fd = rustix::fs::openat(
            &t.dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| t.fail("creating the .b3 sidecar", e))?;
        let file = File::from(fd);
        std::io::Write::write_all(&mut &file, bytes)
            .map_err(|e| t.fail_io("writing the .b3 sidecar", e))?;
        if fsync {
            file.sync_all()
                .map_err(|e| t.fail_io("syncing the .b3 sidecar", e))?;
        }
        Ok(())
    }
}

impl Drop for TempOutput<'_> {
    fn drop(&mut self) {
        // Unpublished: our bytes. Published over an earlier file: that file, exchanged out.
        // Published without replacing anything: nothing (the unlink fails harmlessly).
        let dir = &self.target.dir;
        if !self.keep {
            let _ = rustix::fs::unlinkat(dir, temp_name(&self.job_id), AtFlags::empty());
        }
        let _ = rustix::fs::unlinkat(dir, sidecar_temp_name(&self.job_id), AtFlags::empty());
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
    }

    #[test]
    fn publish_creates_parents_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let target = OutputTarget::new(dir.path(), "a/b/out.bin").unwrap();
        let hash = blake3::hash(b"");
        let how = Publish {
            overwrite: false,
            fsync: true,
            sidecar: true,
        };
        target
            .create_temp("j1", 0)
            .unwrap()
            .publish(&hash, how)
            .unwrap();
        assert!(dir.path().join("a/b/out.bin.b3").exists());
        let err = target
            .create_temp("j2", 0)
            .unwrap()
            .publish(&hash, how)
            .unwrap_err();
        assert!(matches!(err, OutputError::Exists { .. }));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
        assert_eq!(left.len(), 2, "temp files were removed");
    }
}
