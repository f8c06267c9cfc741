//! Local files, confined to the rule's `allow.paths`.
//!
//! Every open goes through `openat2(root, relative, RESOLVE_BENEATH)` on a descriptor of the
//! allowed folder, so the file that is opened is *by construction* inside that folder, whatever
//! happens to the path between check and open. Symlinks are followed as long as they stay inside
//! the folder; one that leads into a *different* allowed folder is found by canonicalizing the path
//! and opening the canonical remainder beneath that folder with symlinks forbidden, so again the
//! kernel, not a string comparison, enforces the boundary.
//!
//! The planning pass opens with `O_PATH` (no data access: FIFOs and devices are never opened for
//! real, so nothing can block), the copy pass with `O_NONBLOCK` for the same reason; both `fstat`
//! the descriptor they got, and the copy pass compares it with the planned [`Pin`].

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{Pin, Probe, SourceError};

/// A local source file opened for reading.
pub struct LocalFile {
    file: File,
    /// The source as the manifest wrote it, for messages.
    what: String,
    pin: Pin,
}

impl LocalFile {
    /// Refuse the file (`Changed`) unless it still is what planning saw. Called after its bytes
    /// were read: a same-size rewrite in place during the read leaves the inode, and maybe the
    /// size, alone but moves mtime and ctime, so the bytes just read may be spliced.
    pub fn recheck(&self) -> Result<(), SourceError> {
        let st = rustix::fs::fstat(&self.file).map_err(|e| SourceError::ReadFailed {
            what: self.what.clone(),
            source: e.into(),
        })?;
        if pin_of(&st) != self.pin {
            return Err(SourceError::Changed {
                what: self.what.clone(),
                reason: "it was modified while being read (size, mtime or ctime moved)".into(),
            });
        }
        Ok(())
    }

    /// `pread`: never a memory map, so a source truncated under us is a short read (reported as
    /// `source_changed`), not a SIGBUS.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn into_reader(self) -> File {
        self.file
    }
}

struct Root {
    /// As configured (absolute), for the fast lexical match.
    given: PathBuf,
    /// Symlinks resolved, for matching canonical source paths.
    canonical: PathBuf,
    fd: OwnedFd,
}

/// Resolves manifest paths to files inside the allowed folders.
pub struct LocalResolver {
    source_root: Option<PathBuf>,
    /// The allowed folder that is the source_root, if it is one.
    source_root_index: Option<usize>,
    roots: Vec<Root>,
}

impl LocalResolver {
    /// Open a descriptor on each allowed folder for the duration of a job.
    pub fn new(source_root: Option<&Path>, allow: &[PathBuf]) -> Result<Self, SourceError> {
        let mut roots = Vec::with_capacity(allow.len());
        for given in allow {
            let fail = |reason: String| SourceError::NotAllowed {
                what: given.display().to_string(),
                reason,
            };
            let canonical = std::fs::canonicalize(given)
                .map_err(|e| fail(format!("allowed folder is unusable: {e}")))?;
            let fd = rustix::fs::open(
                &canonical,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail(format!("allowed folder is unusable: {e}")))?;
            roots.push(Root {
                given: given.clone(),
                canonical,
                fd,
            });
        }
        let source_root_index = source_root.and_then(|s| roots.iter().position(|r| r.given == s));
        Ok(Self {
            source_root: source_root.map(Path::to_path_buf),
            source_root_index,
            roots,
        })
    }

    /// Check a source and learn its size and identity, without opening its data.
    ///
    /// The pin is taken only once the file has settled (see `settled`): a file changed in the
    /// last [`SETTLE`] may have a write in flight whose bytes are not all there yet.
    pub fn probe(&self, path: &str) -> Result<Probe, SourceError> {
        let fd = self.open_beneath(path, OFlags::PATH | OFlags::CLOEXEC)?;
        let st = settled(&self.shown(path), &fd)?;
        let pin = pin_of(&st);
        Ok(Probe {
            size: st.st_size as u64,
            pin,
            identity: pin.0,
        })
    }

    /// Open a probed source for reading, refusing it unless it is still the planned file.
    pub fn open(&self, path: &str, pin: Pin) -> Result<LocalFile, SourceError> {
        let fd = self.open_beneath(
            path,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        )?;
        // Named only on failure: this is once per segment read.
        let st = regular(path, &fd).map_err(|e| e.named(|| self.shown(path)))?;
        if pin_of(&st) != pin {
            return Err(SourceError::Changed {
                what: path.to_owned(),
                reason: "it is not the file that was planned (inode, size, mtime or ctime differ)"
                    .into(),
            });
        }
        Ok(LocalFile {
            file: File::from(fd),
            what: path.to_owned(),
            pin,
        })
    }

    /// The source as messages name it: as the manifest wrote it, and for a relative path also
    /// what it resolves to (joined to `source_root`), so a user sees which file was looked for.
    pub fn shown(&self, path: &str) -> String {
        match &self.source_root {
            Some(root) if Path::new(path).is_relative() => {
                format!("{path} (resolved to {})", root.join(path).display())
            }
            _ => path.to_owned(),
        }
    }

    /// What `path` is, as [`LocalResolver::probe`] sees it now: the file the kernel opened (its
    /// path with every symlink followed) and its identity, if it is still the file pinned.
    pub fn describe(&self, path: &str, pin: Pin) -> Option<LocalDetail> {
        let fd = self
            .open_beneath(path, OFlags::PATH | OFlags::CLOEXEC)
            .ok()?;
        let st = regular(path, &fd).ok()?;
        if pin_of(&st) != pin {
            return None;
        }
        let resolved = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .ok()?;
        let mtime = UNIX_EPOCH + Duration::new(st.st_mtime as u64, st.st_mtime_nsec as u32);
        Some(LocalDetail {
            resolved,
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime,
        })
    }

    fn open_beneath(&self, path: &str, flags: OFlags) -> Result<OwnedFd, SourceError> {
        self.open_beneath_as(path, flags)
            .map_err(|e| e.named(|| self.shown(path)))
    }

    fn open_beneath_as(&self, path: &str, flags: OFlags) -> Result<OwnedFd, SourceError> {
        if self.roots.is_empty() {
            return Err(SourceError::NotAllowed {
                what: path.to_owned(),
                reason:
                    "local sources are not allowed by this rule (no allow.paths, no source_root)"
                        .into(),
            });
        }
        let given = Path::new(path);
        // The common case, a relative path under a source_root that is itself allowed: open it
        // beneath that folder directly (no joining and prefix-stripping per source).
        if given.is_relative()
            && let Some(root) = self.source_root_index.map(|i| &self.roots[i])
        {
            match openat2(&root.fd, given, flags, ResolveFlags::BENEATH) {
                Ok(fd) => return Ok(fd),
                Err(Errno::XDEV) => {} // leaves it: maybe into another allowed folder
                Err(e) => return Err(errno(path, e)),
            }
        }
        let absolute = if given.is_absolute() {
            given.to_path_buf()
        } else {
            match &self.source_root {
                Some(root) => root.join(given),
                None => {
                    return Err(SourceError::NotAllowed {
                        what: path.to_owned(),
                        reason: "a relative path needs the rule's source_root".into(),
                    });
                }
            }
        };
        // Fast path: the path lies lexically inside an allowed folder; the kernel checks that it
        // also resolves inside it (symlinks and `..` included).
        for root in &self.roots {
            let rel = absolute
                .strip_prefix(&root.given)
                .or_else(|_| absolute.strip_prefix(&root.canonical));
            if let Ok(rel) = rel {
                match openat2(&root.fd, rel, flags, ResolveFlags::BENEATH) {
                    Ok(fd) => return Ok(fd),
                    Err(Errno::XDEV) => break, // escapes this folder: maybe into another one
                    Err(e) => return Err(errno(path, e)),
                }
            }
        }
        // Slow path: follow every symlink, then open the canonical remainder beneath the folder
        // that contains it, with symlinks forbidden so nothing can be swapped in meanwhile.
        let canonical = std::fs::canonicalize(&absolute).map_err(|e| match e.raw_os_error() {
            Some(code) => errno(path, Errno::from_raw_os_error(code)),
            None => SourceError::ReadFailed {
                what: path.to_owned(),
                source: e,
            },
        })?;
        for root in &self.roots {
            if let Ok(rel) = canonical.strip_prefix(&root.canonical) {
                return openat2(
                    &root.fd,
                    rel,
                    flags,
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                )
                .map_err(|e| errno(path, e));
            }
        }
        Err(SourceError::NotAllowed {
            what: path.to_owned(),
            reason: format!("resolves to {}, outside allow.paths", canonical.display()),
        })
    }
}

fn openat2(
    root: &OwnedFd,
    rel: &Path,
    flags: OFlags,
    resolve: ResolveFlags,
) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        flags,
        Mode::empty(),
        resolve | ResolveFlags::NO_MAGICLINKS,
    )
}

/// A local file's identity as `concatd plan` shows it.
#[derive(Debug, Clone)]
pub struct LocalDetail {
    /// The file opened, every symlink followed.
    pub resolved: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

impl SourceError {
    /// The same refusal naming the source as `what()` says (resolution and file-type errors
    /// only: the ones [`LocalResolver::open_beneath`] and `regular` give).
    fn named(self, what: impl FnOnce() -> String) -> Self {
        match self {
            Self::NotFound { reason, .. } => Self::NotFound {
                what: what(),
                reason,
            },
            Self::NotAllowed { reason, .. } => Self::NotAllowed {
                what: what(),
                reason,
            },
            Self::NotRegular { file_type, .. } => Self::NotRegular {
                what: what(),
                file_type,
            },
            Self::ReadFailed { source, .. } => Self::ReadFailed {
                what: what(),
                source,
            },
            other => other,
        }
    }
}

fn errno(path: &str, e: Errno) -> SourceError {
    let what = path.to_owned();
    match e {
        Errno::NOENT | Errno::NOTDIR => SourceError::NotFound {
            what,
            // "No such file or directory", without rustix's " (os error 2)".
            reason: std::io::Error::from(e)
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or_default()
                .to_owned(),
        },
        Errno::XDEV | Errno::LOOP => SourceError::NotAllowed {
            what,
            reason: "resolves outside allow.paths".into(),
        },
        other => SourceError::ReadFailed {
            what,
            source: other.into(),
        },
    }
}

fn regular(path: &str, fd: &OwnedFd) -> Result<rustix::fs::Stat, SourceError> {
    let st = rustix::fs::fstat(fd).map_err(|e| SourceError::ReadFailed {
        what: path.to_owned(),
        source: e.into(),
    })?;
    let file_type = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => return Ok(st),
        FileType::Directory => "directory",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    };
    Err(SourceError::NotRegular {
        what: path.to_owned(),
        file_type,
    })
}

/// How long after its last change (ctime) a file is taken to hold no write in flight. Linux
/// moves mtime and ctime at the *start* of a write(2), before the data is copied in, so a pin
/// taken while the last write of a rewrite is in flight matches the file once the write is done,
/// and a recheck after the reads cannot tell that some bytes read were the old ones. 20 ms
/// covers the coarse timestamp clock lagging real time (one jiffy: 10 ms at HZ=100, 4 ms at
/// HZ=250) plus a write(2) of some megabytes into the page cache or a writer preempted for a
/// time slice within one; it is a wait only for a file changed that recently.
pub const SETTLE: Duration = Duration::from_millis(20);

/// How long [`settled`] waits for a file that keeps changing before it refuses it.
pub const SETTLE_LIMIT: Duration = Duration::from_millis(200);

/// `fstat` a file until its last change is at least [`SETTLE`] old (like git's "racy" index
/// entries): for a file not changed recently, one `fstat` and no wait. Any write that starts
/// later moves ctime past the one seen (a change after a query gets a new timestamp, and one
/// more than a jiffy later a different coarse one), so the pin only misses a single write(2)
/// that started before the last change and is still copying [`SETTLE`] later.
fn settled(path: &str, fd: &OwnedFd) -> Result<rustix::fs::Stat, SourceError> {
    let started = Instant::now();
    let mut st = regular(path, fd)?;
    loop {
        let age = change_age(&st);
        if age.is_some_and(|age| age >= SETTLE) {
            return Ok(st);
        }
        if started.elapsed() >= SETTLE_LIMIT {
            return Err(SourceError::Changed {
                what: path.to_owned(),
                reason: format!(
                    "it is still being written (changed again within {} ms, for {} ms)",
                    SETTLE.as_millis(),
                    SETTLE_LIMIT.as_millis()
                ),
            });
        }
        // A ctime in the future means the clock was set back: then two fstats SETTLE apart
        // that agree are all there is to go by.
        std::thread::sleep(age.map_or(SETTLE, |age| SETTLE - age));
        let again = regular(path, fd)?;
        if age.is_none() && pin_of(&again) == pin_of(&st) {
            return Ok(again);
        }
        st = again;
    }
}

/// How long ago the file last changed (its ctime), `None` if that is in the future.
fn change_age(st: &rustix::fs::Stat) -> Option<Duration> {
    let Ok(secs) = u64::try_from(st.st_ctime) else {
        return Some(Duration::MAX); // before 1970: long settled
    };
    let ctime = UNIX_EPOCH + Duration::new(secs, st.st_ctime_nsec as u32);
    SystemTime::now().duration_since(ctime).ok()
}

fn pin_of(st: &rustix::fs::Stat) -> Pin {
    let mut h = blake3::Hasher::new();
    for v in [
        st.st_dev,
        st.st_ino,
        st.st_size as u64,
        st.st_mtime as u64,
        st.st_mtime_nsec,
        // ctime too: a writer can put mtime back (touch -d, utimensat), never ctime.
        st.st_ctime as u64,
        st.st_ctime_nsec,
    ] {
        h.update(&v.to_le_bytes());
    }
    let bytes = h.finalize();
    Pin(u64::from_le_bytes(
        bytes.as_bytes()[..8].try_into().expect("8 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_out_of_the_allowed_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), allowed.join("link")).unwrap();
        std::fs::write(allowed.join("ok"), b"ok").unwrap();
        let r = LocalResolver::new(Some(&allowed), std::slice::from_ref(&allowed)).unwrap();
        assert_eq!(r.probe("ok").unwrap().size, 2);
        assert!(matches!(
            r.probe("link"),
            Err(SourceError::NotAllowed { .. })
        ));
        assert!(matches!(
            r.probe("../secret"),
            Err(SourceError::NotAllowed { .. })
        ));
        assert!(matches!(r.probe("nope"), Err(SourceError::NotFound { .. })));
        assert!(matches!(r.probe("."), Err(SourceError::NotRegular { .. })));
    }

    #[test]
    fn symlink_into_a_second_allowed_folder_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("f"), b"data").unwrap();
        std::os::unix::fs::symlink(b.join("f"), a.join("l")).unwrap();
        let r = LocalResolver::new(Some(&a), &[a.clone(), b.clone()]).unwrap();
        let probe = r.probe("l").unwrap();
        assert_eq!(probe.size, 4);
        let f = r.open("l", probe.pin).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 4);
    }

    #[test]
    fn a_rewritten_file_no_longer_matches_its_pin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let r = LocalResolver::new(Some(dir.path()), &[dir.path().to_path_buf()]).unwrap();
        let probe = r.probe("f").unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"two!").unwrap();
        assert!(matches!(
            r.open("f", probe.pin),
            Err(SourceError::Changed { .. })
        ));
    }

    #[test]
    fn a_file_just_written_is_pinned_only_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let r = LocalResolver::new(Some(dir.path()), &[dir.path().to_path_buf()]).unwrap();
        std::fs::write(&p, b"fresh").unwrap();
        let probe = r.probe("f").unwrap();
        let st = rustix::fs::stat(&p).unwrap();
        let age = change_age(&st).unwrap();
        assert!(age >= SETTLE, "pinned {age:?} after the last change");
        assert_eq!(r.probe("f").unwrap().pin, probe.pin);
    }
}
