//! Live reload of the rules file.
//!
//! The new file is read and validated whole; if it is invalid, the error is logged and nothing
//! changes. Otherwise: a rule added starts watching; a rule removed stops taking manifests and its
//! running jobs finish; a rule edited applies to jobs that start after the reload (a job reads its
//! rule once, when it starts) — if its folder or polling changed, its watch is replaced. Log
//! settings and `max_jobs` change at once; `shutdown_grace` applies to the next shutdown.

use std::path::Path;
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::Daemon;
use crate::config;

/// Watch the folder of the rules file (editors replace the file, so watching the file itself
/// would go stale) and send `()` when the rules file is written or renamed into place.
pub fn watch_rules_file(
    path: &Path,
    tx: UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Create(_)
        );
        if relevant && event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = tx.send(());
        }
    })?;
    let folder = path.parent().unwrap_or(Path::new("."));
    watcher.watch(folder, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Reload the rules file into `daemon`, or keep the running rules if it is invalid.
pub(super) fn reload(daemon: &mut Daemon, why: &str) {
    let new = match config::load(&daemon.rules.path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload ({why}) refused, the running rules stay as they were: {e}");
            return;
        }
    };
    if new == daemon.rules {
        tracing::debug!("reload ({why}): no change");
        return;
    }
    if let Err(e) = daemon.logs.configure(&new) {
        tracing::error!("reload ({why}) refused: cannot open the rule logs: {e}");
        return;
    }
    let old_max = daemon.rules.max_jobs;
    if new.max_jobs > old_max {
        daemon.global.add_permits(new.max_jobs - old_max);
    } else if new.max_jobs < old_max {
        // Take the surplus permits out as running jobs give them back.
        let global = daemon.global.clone();
        let surplus = (old_max - new.max_jobs) as u32;
        tokio::spawn(async move {
            if let Ok(p) = global.acquire_many(surplus).await {
                p.forget();
            }
        });
    }
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let old_names: Vec<String> = daemon.running.keys().cloned().collect();
    for name in old_names {
        if new.rule(&name).is_none() {
            daemon.retire_rule(&name);
            removed.push(name);
        }
    }
    for rule in &new.rules {
        let Some(handle) = daemon.running.get(&rule.name) else {
            match daemon.start_rule(rule) {
                Ok(()) => added.push(rule.name.clone()),
                Err(e) => tracing::error!("reload ({why}): rule {} not started: {e}", rule.name),
            }
            continue;
        };
        let current = handle.rule.read().expect("rule lock").clone();
        if *current == *rule {
            continue;
        }
        changed.push(rule.name.clone());
        if current.watch == rule.watch && current.poll_interval == rule.poll_interval {
            *handle.rule.write().expect("rule lock") = Arc::new(rule.clone());
        } else {
            daemon.retire_rule(&rule.name);
            if let Err(e) = daemon.start_rule(rule) {
                tracing::error!("reload ({why}): rule {} not restarted: {e}", rule.name);
            }
        }
    }
    if new.api != daemon.rules.api {
        tracing::warn!("reload ({why}): the api section changed: it applies at the next start");
    }
    *daemon.shared.write().expect("rules lock") = Arc::new(new.clone());
    daemon.rules = new;
    tracing::info!(
        added = ?added, removed = ?removed, changed = ?changed,
        "reloaded ({why})"
    );
}
