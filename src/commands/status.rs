//! `concatd status`: per rule, whether a live daemon watches it, manifests waiting, running, done
//! and failed, and the latest results — read from the folders, so it works whether or not the
//! daemon runs. A claimed job counts as running only while a live daemon watches its folder;
//! without one it waits for the next start, which resumes it.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use super::load_rules;
use crate::inbox::{self, DONE_DIR, DaemonInfo, FAILED_DIR, WORK_DIR, scan};
use crate::result::JobResult;

/// Results shown per rule.
const LATEST: usize = 5;

#[derive(Serialize)]
struct RuleStatus {
    name: String,
    /// The live daemon watching this rule's folder, `null` when none does.
    daemon: Option<DaemonInfo>,
    waiting: usize,
    running: usize,
    done: usize,
    failed: usize,
    latest: Vec<JobResult>,
}

#[derive(Serialize)]
struct Status {
    rules: Vec<RuleStatus>,
}

pub fn run(config: &Path, json: bool) -> anyhow::Result<i32> {
    let rules = match load_rules(config) {
        Ok(rules) => rules,
        Err(code) => return Ok(code),
    };
    let mut status = Status { rules: Vec::new() };
    for rule in &rules.rules {
        let daemon = inbox::live_daemon(&rule.watch);
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
        status.rules.push(RuleStatus {
            name: rule.name.clone(),
            daemon,
            waiting,
            running,
            done,
            failed,
            latest,
        });
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "{:<20} {:>8} {:>8} {:>8} {:>8}  DAEMON",
        "RULE", "WAITING", "RUNNING", "DONE", "FAILED"
    )?;
    for r in &status.rules {
        let daemon = match &r.daemon {
            Some(d) => format!("pid {} since {}", d.pid, d.since),
            None => "none (claimed jobs resume when one starts)".to_owned(),
        };
        writeln!(
            out,
            "{:<20} {:>8} {:>8} {:>8} {:>8}  {daemon}",
            r.name, r.waiting, r.running, r.done, r.failed
        )?;
    }
    for r in &status.rules {
        for res in &r.latest {
            let what = match (&res.output, &res.error) {
                (_, Some(e)) => format!("failed {}: {}", e.kind, e.message),
                (Some(out), None) => format!("succeeded -> {out}"),
                (None, None) => "succeeded".to_owned(),
            };
            writeln!(
                out,
                "{}  {}  {}  {what}",
                res.finished_at, r.name, res.manifest
            )?;
        }
    }
    Ok(0)
}

/// Count the result files in `dir`, adding (mtime, path) of each to `out`.
fn results_in(dir: &Path, out: &mut Vec<(SystemTime, std::path::PathBuf)>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().ends_with(".result.json") {
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
