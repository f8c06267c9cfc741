//! The status document of `status --json` and `GET /v1/rules`: per rule, whether a live daemon
//! watches it, manifests waiting, running, done and failed, and the latest results — read from
//! the folders, so it holds whether or not a daemon runs. A claimed job counts as running only
//! while a live daemon watches its folder; without one it waits for the next start, which
//! resumes it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::{DONE_DIR, DaemonInfo, FAILED_DIR, RESULT_SUFFIX, WORK_DIR, live_daemon, scan};
use crate::config::Rule;
use crate::result::JobResult;

/// Results shown per rule.
const LATEST: usize = 5;

/// One rule's line of the status document.
#[derive(Debug, Serialize)]
pub struct RuleStatus {
    pub name: String,
    /// The live daemon watching this rule's folder, `null` when none does.
    pub daemon: Option<DaemonInfo>,
    pub waiting: usize,
    pub running: usize,
    pub done: usize,
    pub failed: usize,
    pub latest: Vec<JobResult>,
}

/// The status document: `{"rules": [...]}`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub rules: Vec<RuleStatus>,
}

/// The status of `rules`, in their order.
pub fn status<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Status {
    Status {
        rules: rules.into_iter().map(rule_status).collect(),
    }
}

fn rule_status(rule: &Rule) -> RuleStatus {
    let daemon = live_daemon(&rule.watch);
    let mut waiting = scan(&rule.watch)
        .map(|s| s.ready.len() + s.fresh)
        .unwrap_or(0);
    let claimed = std::fs::read_dir(rule.watch.join(WORK_DIR))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .count()
        })
        .unwrap_or(0);
    let running = if daemon.is_some() {
        claimed
    } else {
        waiting += claimed;
        0
    };
    let mut results = Vec::new();
    let done = results_in(&rule.watch.join(DONE_DIR), &mut results);
    let failed = results_in(&rule.watch.join(FAILED_DIR), &mut results);
    results.sort_by_key(|r| std::cmp::Reverse(r.0));
    let latest = results
        .iter()
        .take(LATEST)
        .filter_map(|(_, p)| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect();
    RuleStatus {
        name: rule.name.clone(),
        daemon,
        waiting,
        running,
        done,
        failed,
        latest,
    }
}

/// Count the result files in `dir`, adding (mtime, path) of each to `out`.
fn results_in(dir: &Path, out: &mut Vec<(SystemTime, PathBuf)>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name()
            .as_encoded_bytes()
            .ends_with(RESULT_SUFFIX.as_bytes())
        {
            n += 1;
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((mtime, e.path()));
        }
    }
    n
}
