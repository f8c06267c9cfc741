//! Noticing manifests: one inotify watch (or a poller) per rule folder.
//!
//! A manifest is taken only once it is complete: on close-after-write (`Access(Close(Write))`)
//! or on being renamed into the folder (`Modify(Name(To|Both))`), never on create or modify,
//! when a producer may still be writing. The watch is armed *before* the folder is scanned, so a
//! file dropped in between is seen by one or the other (the queue drops duplicates). A lost-event
//! notice from the kernel (queue overflow, `Flag::Rescan`) asks for a new scan. The notify handler
//! runs on notify's own thread and must never block: it only sends into an unbounded channel.
//!
//! With `poll_interval` (network filesystems, where inotify sees nothing) the folder is listed at
//! that interval instead, and a file counts as complete when its size and mtime held across two
//! polls.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{Config, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

pub use crate::inbox::{DONE_DIR, FAILED_DIR, SCAN_SETTLE, WORK_DIR, is_candidate, scan};

/// What a watcher tells its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// This file in the watch folder is complete.
    Ready(OsString),
    /// Events may have been lost: list the folder.
    Rescan,
}

/// Why a folder cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch {}: the inotify watch limit is reached (raise fs.inotify.max_user_watches)",
        path.display()
    )]
    TooManyWatches { path: PathBuf },
    #[error("cannot watch {}: too many open files (raise the open file limit)", path.display())]
    TooManyFiles { path: PathBuf },
    #[error("cannot watch {}: {source}", path.display())]
    Other {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Keeps a folder watched while it lives.
pub struct FolderWatch {
    _inotify: Option<notify::RecommendedWatcher>,
    /// The polling task stops when this is dropped.
    _poll: Option<tokio_util::sync::DropGuard>,
}

/// Start watching `dir` and send what is seen to `tx`. Sends one `Rescan` once armed.
pub fn start(
    dir: &Path,
    poll: Option<Duration>,
    tx: UnboundedSender<Notice>,
) -> Result<FolderWatch, WatchError> {
    if let Some(every) = poll {
        let stop = CancellationToken::new();
        tokio::spawn(poll_loop(dir.to_owned(), every, tx, stop.clone()));
        return Ok(FolderWatch {
            _inotify: None,
            _poll: Some(stop.drop_guard()),
        });
    }
    let handler_tx = tx.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else {
            // An error from the backend may mean lost events: look again.
            let _ = handler_tx.send(Notice::Rescan);
            return;
        };
        if event.need_rescan() {
            let _ = handler_tx.send(Notice::Rescan);
            return;
        }
        let path = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => event.paths.first(),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event.paths.get(1),
            _ => None,
        };
        if let Some(name) = path.and_then(|p| p.file_name())
            && is_candidate(name)
        {
            let _ = handler_tx.send(Notice::Ready(name.to_owned()));
        }
    };
    let fail = |source: notify::Error| match &source.kind {
        notify::ErrorKind::Io(e) if e.raw_os_error() == Some(28) => WatchError::TooManyWatches {
            path: dir.to_owned(),
        },
        notify::ErrorKind::MaxFilesWatch => WatchError::TooManyWatches {
            path: dir.to_owned(),
        },
        notify::ErrorKind::Io(e) if e.raw_os_error() == Some(24) => WatchError::TooManyFiles {
            path: dir.to_owned(),
        },
        _ => WatchError::Other {
            path: dir.to_owned(),
            source,
        },
    };
    let mut watcher =
        notify::RecommendedWatcher::new(handler, Config::default().with_follow_symlinks(false))
            .map_err(fail)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(fail)?;
    // Armed: now list the folder, so nothing dropped before (or while down) is missed.
    let _ = tx.send(Notice::Rescan);
    Ok(FolderWatch {
        _inotify: Some(watcher),
        _poll: None,
    })
}

async fn poll_loop(
    dir: PathBuf,
    every: Duration,
    tx: UnboundedSender<Notice>,
    stop: CancellationToken,
) {
    let mut seen: HashMap<OsString, (u64, Option<SystemTime>)> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let d = dir.clone();
        let listing = tokio::task::spawn_blocking(move || poll_once(&d)).await;
        let Ok(Ok(now)) = listing else { continue };
        for (name, state) in &now {
            if seen.get(name) == Some(state) && tx.send(Notice::Ready(name.clone())).is_err() {
                return;
            }
        }
        seen = now;
    }
}

fn poll_once(dir: &Path) -> std::io::Result<HashMap<OsString, (u64, Option<SystemTime>)>> {
    let mut now = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !is_candidate(&name) {
            continue;
        }
        if let Ok(meta) = entry.metadata()
            && meta.is_file()
        {
            now.insert(name, (meta.len(), meta.modified().ok()));
        }
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn producer_names_and_own_folders_are_ignored() {
        for bad in [
            ".hidden.json",
            "a.json.tmp",
            "a.json.part",
            "a.json~",
            ".work",
            "done",
            "failed",
        ] {
            assert!(!is_candidate(OsStr::new(bad)), "{bad}");
        }
        for good in ["a.json", "b.yaml", "c", "tmp.json", "done.json"] {
            assert!(is_candidate(OsStr::new(good)), "{good}");
        }
    }

    #[test]
    fn non_utf8_producer_names_are_ignored() {
        use std::os::unix::ffi::OsStrExt;
        for bad in [
            &b"\xe9t\xe9.json.tmp"[..],
            b"\xe9t\xe9.json.part",
            b"\xe9t\xe9.json~",
            b".\xe9t\xe9.json",
        ] {
            assert!(!is_candidate(OsStr::from_bytes(bad)), "{bad:?}");
        }
        assert!(is_candidate(OsStr::from_bytes(b"\xe9t\xe9.json")));
    }

    #[test]
    fn scan_lists_regular_candidates_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(100);
        for (i, name) in ["b.json", "a.json", "c.json"].iter().enumerate() {
            let p = dir.path().join(name);
            std::fs::write(&p, "{}").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + Duration::from_secs(i as u64)).unwrap();
        }
        std::fs::write(dir.path().join(".x.json.tmp"), "{}").unwrap();
        std::fs::write(dir.path().join("new.json"), "{").unwrap();
        std::fs::create_dir(dir.path().join("done")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let found = scan(dir.path()).unwrap();
        assert_eq!(found.ready, ["b.json", "a.json", "c.json"]);
        assert_eq!(found.fresh, 1, "new.json may still be being written");
    }
}
