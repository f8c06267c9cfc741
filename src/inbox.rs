//! The watch folder's layout, as every command sees it: the daemon's own sub-folders, and who is
//! watching.
//!
//! A live daemon holds a *presence lock* per watch folder: `.work/.daemon-<pid>.lock`, `flock`ed
//! exclusively for as long as the daemon watches the folder, and holding `{"pid", "since"}`. The
//! kernel drops the lock when the process dies, however it dies, so "some presence file is
//! locked" is exactly "a daemon is alive and watching"; a file left by a dead daemon is stale and
//! is removed by the next daemon to start. Readers (`status`, `submit --wait`) test a lock with a
//! *shared*, non-blocking `flock` and release it at once: the daemon never locks its file again,
//! so a reader cannot disturb it. The file is written and locked under a temporary name, then
//! renamed into place (the lock belongs to the inode), so no reader ever sees an unlocked file of
//! a live daemon. Several daemons may watch one folder (claims keep them apart); each has its own
//! file.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

/// Sub-folders of a watch folder that the daemon owns.
pub const WORK_DIR: &str = ".work";
pub const DONE_DIR: &str = "done";
pub const FAILED_DIR: &str = "failed";

const PRESENCE_PREFIX: &str = ".daemon-";
const PRESENCE_SUFFIX: &str = ".lock";

/// Why the watch folder's bookkeeping failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InboxError + 'a {
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
    let path = work.join(format!("{PRESENCE_PREFIX}{pid}{PRESENCE_SUFFIX}"));
    let temp = work.join(format!("{PRESENCE_PREFIX}{pid}{PRESENCE_SUFFIX}.tmp"));
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

#[cfg(test)]
mod tests {
    use super::*;

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
