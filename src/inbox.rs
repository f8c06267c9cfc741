//! The watch folder's layout, as every command sees it: the daemon's own sub-folders, the names
//! manifests and results are filed under, durable writes, and who is watching.
//!
//! A live daemon holds a *presence lock* per watch folder: `.work/.daemon-<pid>-<random>.lock`, `flock`ed
//! exclusively for as long as the daemon watches the folder, and holding `{"pid", "since"}`. The
//! kernel drops the lock when the process dies, however it dies, so "some presence file is
//! locked" is exactly "a daemon is alive and watching"; a file left by a dead daemon is stale and
//! is removed by the next daemon to start. Readers (`status`, `submit --wait`) test a lock with a
//! *shared*, non-blocking `flock` and release it at once: the daemon never locks its file again,
//! so a reader cannot disturb it. The file is written and locked under a temporary name, then
//! renamed into place (the lock belongs to the inode), so no reader ever sees an unlocked file of
//! a live daemon. Several daemons may watch one folder (claims keep them apart); each has its own
//! file.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

mod named;
mod status;
mod wait;

pub use named::{JobState, api_name, filed_under, is_job_id, job_state, proposed_id};
pub use status::{RuleStatus, Status, status};
pub use wait::{Dropped, LIVENESS_EVERY, ResultWatch, Waited, find_result, wait_result};

/// Sub-folders of a watch folder that the daemon owns.
pub const WORK_DIR: &str = ".work";
pub const DONE_DIR: &str = "done";
pub const FAILED_DIR: &str = "failed";

/// The longest file name (`NAME_MAX` of Linux filesystems), in bytes.
pub const NAME_MAX: usize = 255;

/// What a filed result's name adds to its manifest's.
pub const RESULT_SUFFIX: &str = ".result.json";

// ---- Which names are manifests, and which are waiting ----

/// Whether a name in a watch folder may be a manifest: not hidden, not a temporary or backup
/// name a producer writes before renaming, not one of the daemon's own folders.
pub fn is_candidate(name: &OsStr) -> bool {
    // On bytes, so that a name that is not valid UTF-8 gets every check too.
    let name = name.as_encoded_bytes();
    !(name.is_empty()
        || name.starts_with(b".")
        || name.ends_with(b".tmp")
        || name.ends_with(b".part")
        || name.ends_with(b"~")
        || name == DONE_DIR.as_bytes()
        || name == FAILED_DIR.as_bytes())
}

/// How old a file found by a scan must be to be taken: a scan cannot see whether a writer still
/// has the file open, so a file modified this recently is left for its close event or the next
/// scan. (A producer that writes in place and pauses longer than this while the daemon starts or
/// recovers from lost events may see its file taken early: producers should rename files in.)
pub const SCAN_SETTLE: Duration = Duration::from_secs(1);

/// What a scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Candidates, oldest first (mtime, then name): the arrival order as well as a listing can tell.
    pub ready: Vec<OsString>,
    /// Candidates modified less than [`SCAN_SETTLE`] ago: scan again later.
    pub fresh: usize,
}

/// The candidate regular files in `dir` that have settled.
pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let settled = SystemTime::now() - SCAN_SETTLE;
    let mut fresh = 0;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !is_candidate(&name) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if mtime > settled {
                fresh += 1;
            } else {
                found.push((mtime, name));
            }
        }
    }
    found.sort();
    Ok(Scan {
        ready: found.into_iter().map(|(_, n)| n).collect(),
        fresh,
    })
}

const PRESENCE_PREFIX: &str = ".daemon-";
const PRESENCE_SUFFIX: &str = ".lock";

/// Why the watch folder's bookkeeping failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("{} is already waiting to be taken: pick another name", path.display())]
    Waiting { path: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl InboxError {
    /// The kind of the underlying I/O error (a full disk stays recognisable when wrapped).
    pub fn io_kind(&self) -> std::io::ErrorKind {
        match self {
            Self::Io { source, .. } => source.kind(),
            Self::Waiting { .. } => std::io::ErrorKind::AlreadyExists,
        }
    }
}

/// An I/O error of `action` on `path`, for `map_err`.
pub(crate) fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InboxError + 'a {
    move |source| InboxError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Who watches a folder: the record in a presence file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    /// RFC 3339: when it started watching this folder.
    pub since: String,
}

/// A presence lock this process holds on a watch folder; dropped (file removed, lock released)
/// when the daemon stops watching it.
#[derive(Debug)]
pub struct Presence {
    path: PathBuf,
    _lock: File,
}

impl Drop for Presence {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Announce that this process watches `watch` (whose `.work/` exists). Stale presence files of
/// dead daemons are removed on the way.
pub fn announce(watch: &Path) -> Result<Presence, InboxError> {
    let work = watch.join(WORK_DIR);
    for (path, live) in presence_files(&work) {
        if live.is_none() {
            let _ = std::fs::remove_file(path);
        }
    }
    let pid = std::process::id();
    // The pid alone is not unique among daemons sharing a folder: each container's daemon may be
    // pid 1, and one's rename would replace (and its exit remove) the other's file.
    let nonce = {
        let mut h = blake3::Hasher::new();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default());
        h.finalize().to_hex()[..16].to_owned()
    };
    let path = work.join(format!("{PRESENCE_PREFIX}{pid}-{nonce}{PRESENCE_SUFFIX}"));
    let temp = work.join(format!(
        "{PRESENCE_PREFIX}{pid}-{nonce}{PRESENCE_SUFFIX}.tmp"
    ));
    let mut file = File::create(&temp).map_err(io("creating", &temp))?;
    rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| io("locking", &temp)(e.into()))?;
    let info = DaemonInfo {
        pid,
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let json = serde_json::to_vec(&info).expect("presence serializes");
    file.write_all(&json).map_err(io("writing", &temp))?;
    std::fs::rename(&temp, &path).map_err(io("renaming into place", &path))?;
    Ok(Presence { path, _lock: file })
}

/// The live daemon watching `watch` (the longest-running, when several do), if any.
pub fn live_daemon(watch: &Path) -> Option<DaemonInfo> {
    presence_files(&watch.join(WORK_DIR))
        .into_iter()
        .filter_map(|(_, live)| live)
        .min_by(|a, b| a.since.cmp(&b.since).then(a.pid.cmp(&b.pid)))
}

/// Every presence file in `work`, with its record when a live process holds it.
fn presence_files(work: &Path) -> Vec<(PathBuf, Option<DaemonInfo>)> {
    let Ok(entries) = std::fs::read_dir(work) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| is_presence_name(&e.file_name()))
        .map(|e| {
            let path = e.path();
            let live = File::open(&path).ok().and_then(|f| {
                match rustix::fs::flock(&f, FlockOperation::NonBlockingLockShared) {
                    // Nobody holds it: a dead daemon's file (our shared lock goes with `f`).
                    Ok(()) => None,
                    Err(_) => std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok()),
                }
            });
            (path, live)
        })
        .collect()
}

fn is_presence_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    b.starts_with(PRESENCE_PREFIX.as_bytes()) && b.ends_with(PRESENCE_SUFFIX.as_bytes())
}

// ---- Names of filed manifests and results, and durable writes ----

/// `NAME.result.json`.
pub fn result_name(name: &OsStr) -> OsString {
    let mut r = name.to_owned();
    r.push(RESULT_SUFFIX);
    r
}

/// `name` split before its extension (`.json`, `.yaml`…): none when the name has no dot past its
/// first byte, or when what follows the last dot is too long to be an extension worth keeping.
fn split_ext(name: &[u8]) -> (&[u8], &[u8]) {
    match name.iter().rposition(|&b| b == b'.').filter(|&i| i > 0) {
        Some(i) if name.len() - i <= 16 => name.split_at(i),
        _ => (name, &[]),
    }
}

/// `fsync` a folder, so renames and links in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), InboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing folder", dir))
}

/// Write `bytes` to `path` atomically: a temp file beside it, fsync (if asked), rename.
pub fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), InboxError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let mut f = File::create(&temp).map_err(io("writing", &temp))?;
    f.write_all(bytes).map_err(io("writing", &temp))?;
    if fsync {
        f.sync_all().map_err(io("syncing", &temp))?;
    }
    std::fs::rename(&temp, path).map_err(io("renaming into place", path))?;
    if fsync && let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// The `n`th name for `name` in `done/` or `failed/`: `NAME`, then `stem-1.ext`, `stem-2.ext`…
/// (the extension kept, so a YAML manifest still reads as YAML).
pub fn suffixed(name: &OsStr, n: u32) -> OsString {
    if n == 0 {
        return name.to_owned();
    }
    let (stem, ext) = split_ext(name.as_encoded_bytes());
    let mut d = stem.to_vec();
    d.extend_from_slice(format!("-{n}").as_bytes());
    d.extend_from_slice(ext);
    OsString::from_vec(d)
}

/// The `n`th name to file `name` under: [`suffixed`], unless `D.result.json` would then be longer
/// than a file name may be; then the name is cut short and marked with a hash of the whole name
/// (`<prefix>-<16 hex>[-n].ext`, the extension kept), so that the manifest and its result both
/// fit. The result's `manifest` field keeps the name as dropped.
pub fn filed_name(name: &OsStr, n: u32) -> OsString {
    let plain = suffixed(name, n);
    if plain.len() + RESULT_SUFFIX.len() <= NAME_MAX {
        return plain;
    }
    let bytes = name.as_encoded_bytes();
    let (stem, ext) = split_ext(bytes);
    let tag = format!("-{}", &blake3::hash(bytes).to_hex()[..16]);
    let num = if n > 0 {
        format!("-{n}")
    } else {
        String::new()
    };
    let room = NAME_MAX - RESULT_SUFFIX.len() - tag.len() - num.len() - ext.len();
    let mut keep = room.min(stem.len());
    if let Ok(text) = std::str::from_utf8(stem) {
        // A UTF-8 name stays UTF-8.
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
    }
    let mut d = stem[..keep].to_vec();
    d.extend_from_slice(tag.as_bytes());
    d.extend_from_slice(num.as_bytes());
    d.extend_from_slice(ext);
    OsString::from_vec(d)
}

/// How many leading bytes of a manifest's stem every name it may be filed under starts with.
const FILED_PREFIX: usize = 64;

/// The name under `dest` of the file with inode `ino` that was filed from `name` (its name, or
/// its name with a suffix): `submit --wait` finds its own manifest this way.
pub fn find_filed(dest: &Path, name: &OsStr, ino: u64) -> Option<OsString> {
    let (stem, _) = split_ext(name.as_encoded_bytes());
    // A shortened name (see `filed_name`) keeps at least this much of the stem.
    let stem = &stem[..stem.len().min(FILED_PREFIX)];
    std::fs::read_dir(dest).ok()?.find_map(|e| {
        let e = e.ok()?;
        let n = e.file_name();
        let ns = n.as_encoded_bytes();
        (ns.starts_with(stem) && !ns.ends_with(RESULT_SUFFIX.as_bytes()))
            .then(|| e.metadata().ok())
            .flatten()
            .filter(|m| m.ino() == ino)
            .map(|_| n)
    })
}

// ---- Dropping a manifest ----

/// A fresh temporary name for a drop of `name`: `.NAME.<pid>.<random>.tmp`, with `NAME` cut short
/// (on a byte boundary: names are bytes) when the whole would not fit in [`NAME_MAX`].
fn drop_temp_name(name: &OsStr, attempt: u32) -> OsString {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let tail = format!(".{}.{:016x}.tmp", std::process::id(), h.finish());
    let keep = NAME_MAX - 1 - tail.len();
    let bytes = name.as_encoded_bytes();
    let mut temp = b".".to_vec();
    temp.extend_from_slice(&bytes[..bytes.len().min(keep)]);
    temp.extend_from_slice(tail.as_bytes());
    OsString::from_vec(temp)
}

/// Drop a manifest: write `bytes` as `<watch>/NAME` atomically and durably, never replacing a
/// manifest of that name that is still waiting; the new file's inode.
///
/// The bytes go to a temporary file of their own, `.NAME.<pid>.<random>.tmp` (hidden and `.tmp`,
/// so never taken; created exclusively, so two drops of one name never share it), which is
/// fsynced and renamed to `NAME` with `RENAME_NOREPLACE`, then the folder is fsynced.
pub fn drop_manifest(watch: &Path, name: &OsStr, bytes: &[u8]) -> Result<u64, InboxError> {
    let target = watch.join(name);
    let mut attempt = 0;
    let (temp, mut f) = loop {
        let temp = watch.join(drop_temp_name(name, attempt));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
        {
            Ok(f) => break (temp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(io("creating", &temp)(e)),
        }
    };
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        drop(f);
        let _ = std::fs::remove_file(&temp);
        return Err(io("writing", &temp)(e));
    }
    let ino = f.metadata().map_err(io("inspecting", &temp))?.ino();
    drop(f);
    let renamed = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &temp,
        rustix::fs::CWD,
        &target,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&temp);
        if e == rustix::io::Errno::EXIST {
            return Err(InboxError::Waiting { path: target });
        }
        return Err(io("renaming into", &target)(e.into()));
    }
    sync_dir(watch)?;
    Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn drop_temp_names_are_unique_and_fit_name_max() {
        let long = "n".repeat(NAME_MAX);
        for name in ["m.json", long.as_str()] {
            let a = drop_temp_name(OsStr::new(name), 0);
            let b = drop_temp_name(OsStr::new(name), 0);
            assert_ne!(a, b, "two drops of one name share a temporary file");
            for t in [&a, &b] {
                assert!(t.len() <= NAME_MAX, "{t:?}");
                let t = t.as_encoded_bytes();
                assert!(
                    t.starts_with(b".") && t.ends_with(b".tmp"),
                    "{t:?} could be taken"
                );
            }
        }
    }

    #[test]
    fn presence_is_seen_while_held_and_gone_after() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(WORK_DIR)).unwrap();
        assert_eq!(live_daemon(dir.path()), None);
        let p = announce(dir.path()).unwrap();
        let info = live_daemon(dir.path()).expect("live");
        assert_eq!(info.pid, std::process::id());
        // A reader's test does not disturb the holder: still live.
        assert!(live_daemon(dir.path()).is_some());
        drop(p);
        assert_eq!(live_daemon(dir.path()), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join(WORK_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    /// Two daemons with one pid (each pid 1 of its own container, sharing the watch folder): the
    /// second's file must not replace the first's, nor its exit hide the first.
    #[test]
    fn two_presences_of_one_pid_are_both_seen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(WORK_DIR)).unwrap();
        let first = announce(dir.path()).unwrap();
        let second = announce(dir.path()).unwrap();
        drop(second);
        assert!(
            live_daemon(dir.path()).is_some(),
            "the first daemon still watches"
        );
        drop(first);
        assert_eq!(live_daemon(dir.path()), None);
    }

    #[test]
    fn a_dead_daemons_file_is_stale_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join(WORK_DIR);
        std::fs::create_dir(&work).unwrap();
        let stale = work.join(".daemon-999999.lock");
        std::fs::write(&stale, r#"{"pid":999999,"since":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(live_daemon(dir.path()), None, "unlocked: not live");
        let _p = announce(dir.path()).unwrap();
        assert!(!stale.exists(), "swept at start");
    }
}
