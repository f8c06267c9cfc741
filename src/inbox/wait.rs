//! Waiting for the result of a dropped manifest: shared by `submit --wait` and the API's sync
//! calls. Woken by inotify events in `done/` and `failed/` (the result is renamed in there last),
//! with a slow re-check as a safety net for lost events and filesystems without inotify.
//!
//! The manifest is found by the inode of the file the drop created: the daemon only ever renames
//! that file (into its job folder, then into `done/` or `failed/`), so it keeps its inode even
//! when a unique suffix is added to its name.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{DONE_DIR, FAILED_DIR, find_filed, result_name};
use crate::result::JobResult;

/// A manifest this process dropped.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub watch: PathBuf,
    pub name: OsString,
    pub ino: u64,
}

impl Dropped {
    /// Its path as dropped.
    pub fn path(&self) -> PathBuf {
        self.watch.join(&self.name)
    }

    /// Its result, once it is filed.
    pub fn result(&self) -> Option<JobResult> {
        find_result(&self.watch, &self.name, self.ino)
    }
}

/// The result of the manifest dropped as `name` with inode `ino`, once it is filed.
pub fn find_result(watch: &Path, name: &OsStr, ino: u64) -> Option<JobResult> {
    for sub in [DONE_DIR, FAILED_DIR] {
        let dest = watch.join(sub);
        // The common case first: filed under its own name.
        let filed = match std::fs::symlink_metadata(dest.join(name)) {
            Ok(m) if m.ino() == ino => Some(name.to_owned()),
            _ => find_filed(&dest, name, ino),
        };
        if let Some(filed) = filed
            && let Ok(bytes) = std::fs::read(dest.join(result_name(&filed)))
            && let Ok(result) = serde_json::from_slice(&bytes)
        {
            return Some(result);
        }
    }
    None
}

/// Events of a watch folder's `done/` and `failed/`: a counter bumped on every change there.
/// One per folder serves any number of waiters (an inotify instance is a scarce resource).
pub struct ResultWatch {
    changes: watch::Receiver<u64>,
    /// `None` when inotify could not watch the folders: waiters then re-check more often.
    watcher: Option<notify::RecommendedWatcher>,
}

/// How often a waiter re-checks without an event: seldom with inotify, as a safety net; often
/// without it.
const RECHECK_WATCHED: Duration = Duration::from_secs(1);
const RECHECK_UNWATCHED: Duration = Duration::from_millis(100);

/// How often a waiter checks that a daemon still watches the folder.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(1);

impl ResultWatch {
    /// Watch `watch`'s `done/` and `failed/` (those that exist).
    pub fn start(watch: &Path) -> Self {
        let (tx, changes) = watch::channel(0u64);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        })
        .ok()
        .and_then(|mut w| {
            // Both are needed: with one unwatched, a result filed there would wait for the
            // watched pace of re-checks, so the wait falls back to the unwatched pace instead.
            let all = [DONE_DIR, FAILED_DIR].iter().all(|sub| {
                w.watch(&watch.join(sub), RecursiveMode::NonRecursive)
                    .is_ok()
            });
            all.then_some(w)
        });
        Self { changes, watcher }
    }

    fn recheck(&self) -> Duration {
        if self.watcher.is_some() {
            RECHECK_WATCHED
        } else {
            RECHECK_UNWATCHED
        }
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    Filed(Box<JobResult>),
    /// No live daemon watches the folder (checked only when asked): nobody will run the job now.
    NoDaemon,
    /// The deadline passed first.
    TimedOut,
}

/// Wait until `dropped` has its result, `until` passes, or (with `need_daemon`) no daemon
/// watches its folder any more.
pub async fn wait_result(
    dropped: &Dropped,
    events: &ResultWatch,
    until: Option<Instant>,
    need_daemon: bool,
) -> Waited {
    let mut changes = events.changes.clone();
    let mut next_liveness = Instant::now();
    loop {
        changes.borrow_and_update();
        let d = dropped.clone();
        let check_daemon = need_daemon && Instant::now() >= next_liveness;
        let (result, live) = tokio::task::spawn_blocking(move || {
            let result = d.result();
            // Looked at before the result is looked at again: a daemon that files the result
            // and stops in between is not taken for no daemon at all.
            let live = !check_daemon || super::live_daemon(&d.watch).is_some();
            (
                result.or_else(|| (!live).then(|| d.result()).flatten()),
                live,
            )
        })
        .await
        .unwrap_or((None, true));
        if let Some(r) = result {
            return Waited::Filed(Box::new(r));
        }
        if !live {
            return Waited::NoDaemon;
        }
        if check_daemon {
            next_liveness = Instant::now() + LIVENESS_EVERY;
        }
        let recheck = Instant::now() + events.recheck();
        let wake = match until {
            Some(u) if u <= Instant::now() => return Waited::TimedOut,
            Some(u) => u.min(recheck),
            None => recheck,
        };
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}
