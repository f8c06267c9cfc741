//! One queued item, start to finish, on a blocking thread: claim (or resume), run the job through
//! the same code as `concatd once`, file the result.
//!
//! Everything here runs inside a span carrying the rule's name, so the job's own events land in
//! the rule's log (see `logging`).

use std::ffi::OsString;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::claim::{self, JobDir};
use super::recover::{self, Plan};
use super::watch::{DONE_DIR, FAILED_DIR};
use crate::config::Rule;
use crate::job::{self, JobContext, JobStep};
use crate::result::{ErrorKind, JobResult, ResultError, Timing};

/// Work waiting in a rule's queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Item {
    /// A manifest in the watch folder, not yet claimed.
    New(OsString),
    /// A job folder left in `.work/` by an earlier run.
    Resume(PathBuf),
}

/// Claim or resume `item` and see it through. Never panics on I/O trouble: problems are logged,
/// and whatever is claimed stays in `.work/` for the next start.
pub fn run_item(item: Item, rule: &Rule, cancel: &AtomicBool) {
    let span = tracing::info_span!("rule", rule = %rule.name);
    let _enter = span.enter();
    let dir = match item {
        Item::New(name) => {
            match std::fs::symlink_metadata(rule.watch.join(&name)) {
                Ok(m) if m.is_file() => {}
                _ => return, // gone (claimed elsewhere) or not a regular file
            }
            match claim::claim(&rule.watch, &name, &job::new_job_id()) {
                Ok(Some(dir)) => {
                    crate::crash::point("after-claim");
                    tracing::info!(job_id = %dir.id, manifest = %name.to_string_lossy(), "claimed");
                    dir
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(manifest = %name.to_string_lossy(), error = %e, "cannot claim");
                    return;
                }
            }
        }
        Item::Resume(path) => {
            let dir = match JobDir::lock_existing(&path) {
                Ok(Some(dir)) => dir,
                Ok(None) => return, // a live daemon holds it, or it is gone
                Err(e) => {
                    tracing::warn!(error = %e, "cannot resume job");
                    return;
                }
            };
            match recover::assess(dir, rule) {
                Ok(Plan::Gone) => return,
                Ok(Plan::File(dir, result)) => return file(dir, rule, &result),
                Ok(Plan::Rerun(dir)) => {
                    tracing::info!(
                        job_id = %dir.id, manifest = %dir.name.to_string_lossy(),
                        "resuming a job interrupted by a restart"
                    );
                    dir
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot resume job");
                    return;
                }
            }
        }
    };
    let job_span = tracing::info_span!(
        "job", job_id = %dir.id, manifest = %dir.name.to_string_lossy()
    );
    let _job = job_span.enter();
    let _running = crate::metrics::job_running(&rule.name);
    let started_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let journal_dir = dir.path.clone();
    let pieces = dir.path.join(job::PIECES_JOURNAL);
    let hook =
        move |step: &JobStep| recover::write_journal(&journal_dir, step, &started_at, rule.fsync);
    let ctx = JobContext {
        rule,
        job_id: dir.id.clone(),
        cancel: Some(cancel),
        progress: None,
        before_publish: Some(&hook),
        pieces: Some(&pieces),
    };
    let manifest = dir.manifest();
    let result = catch_panic(rule, &dir.id, &manifest, || job::run(&ctx, &manifest));
    if was_cancelled(cancel, &result) {
        tracing::info!(
            job_id = %dir.id, manifest = %dir.name.to_string_lossy(),
            "cancelled at shutdown: left claimed for the next start"
        );
        return;
    }
    if result.status == crate::result::Status::Failed && pieces.exists() {
        remove_kept_temps(&dir, rule);
    }
    file(dir, rule, &result);
}

/// A failed job whose folder holds a pieces journal may have failed before reopening the
/// temporary output an earlier run kept for it to resume in (recovery keeps it, see
/// `recover::clear_unpublished`; a refusal in planning never reaches it): remove it now, since
/// nothing will reopen it once the job is filed.
fn remove_kept_temps(dir: &JobDir, rule: &Rule) {
    let Ok(m) = crate::manifest::Manifest::load(&dir.manifest(), crate::manifest::Origin::Claimed)
    else {
        return;
    };
    let Some(root) = rule.output_root.local() else {
        return;
    };
    if let Ok(Some(t)) = crate::output::OutputTarget::existing_folder(root, &m.output) {
        let removed = t.remove_temps(&dir.id);
        if removed > 0 {
            tracing::info!(job_id = %dir.id, files = removed, "removed the temporary files kept for the failed job");
        }
    }
}

/// A job that failed once the runner's cancel flag was set was aborted by the shutdown (however
/// the abort surfaced): it is left claimed and rerun at the next start, never filed as failed.
/// Decided from the flag, not from the result's message (which also holds the manifest's name).
fn was_cancelled(cancel: &AtomicBool, result: &JobResult) -> bool {
    cancel.load(Ordering::Relaxed) && !result.succeeded()
}

/// Run `job`; a panic becomes a failed result of kind `internal`, filed like any other (rather
/// than no result at all, the lock released and the job rerun by every sweep).
fn catch_panic(
    rule: &Rule,
    job_id: &str,
    manifest: &Path,
    job: impl FnOnce() -> JobResult,
) -> JobResult {
    let started = std::time::SystemTime::now();
    let payload = match std::panic::catch_unwind(AssertUnwindSafe(job)) {
        Ok(result) => return result,
        Err(payload) => payload,
    };
    let why = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    let name = manifest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::error!(job_id = %job_id, manifest = %name, panic = %why, "job panicked");
    let head = job::result_head(rule, job_id, manifest);
    let error = ResultError {
        kind: ErrorKind::Internal,
        message: format!("{name}: internal error: job panicked: {why}"),
        source_index: None,
        problems: Vec::new(),
    };
    JobResult::failed(head, Timing::until_now(started), error)
}

fn file(dir: JobDir, rule: &Rule, result: &JobResult) {
    let sub = if result.succeeded() {
        DONE_DIR
    } else {
        FAILED_DIR
    };
    let id = dir.id.clone();
    let manifest = dir.name.to_string_lossy().into_owned();
    match claim::file_result(dir, &rule.watch.join(sub), result, rule.fsync) {
        Ok(name) => {
            // Counted once filed: a result that cannot be filed stays in `.work/` and is filed
            // (and counted) by a later sweep.
            let took = std::time::Duration::from_millis(result.duration_ms);
            crate::metrics::job_finished(&rule.name, result, took);
            tracing::info!(
                job_id = %id, manifest = %manifest, status = ?result.status,
                result = %format!("{sub}/{}", crate::inbox::result_name(&name).to_string_lossy()),
                "result filed"
            )
        }
        Err(e) => tracing::warn!(
            job_id = %id, manifest = %manifest, error = %e,
            "cannot file the result: left in .work/ for the next start"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::Status;

    fn rule() -> Rule {
        let dir = tempfile::tempdir().unwrap();
        let text = "log_dir: logs\nrules:\n  - name: r\n    watch: in\n    output_root: out\n";
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let rules = crate::config::parse(text, &dir.path().join("rules.yaml"), dir.path()).unwrap();
        rules.rules[0].clone()
    }

    fn failed(kind: ErrorKind, message: &str) -> JobResult {
        let head = crate::result::ResultHead {
            rule: "r".into(),
            manifest: "cancelled.json".into(),
            job_id: "j".into(),
            write_mode: None,
        };
        let error = ResultError {
            kind,
            message: message.into(),
            source_index: None,
            problems: Vec::new(),
        };
        JobResult::failed(head, Timing::until_now(std::time::SystemTime::now()), error)
    }

    #[test]
    fn a_panicking_job_becomes_a_failed_internal_result() {
        let rule = rule();
        let r = catch_panic(&rule, "j1", Path::new("/w/.work/j1/boom.json"), || {
            panic!("index out of bounds")
        });
        assert_eq!(r.status, Status::Failed);
        assert_eq!((r.rule.as_str(), r.job_id.as_str()), ("r", "j1"));
        assert_eq!(r.manifest, "boom.json");
        let e = r.error.unwrap();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(
            e.message,
            "boom.json: internal error: job panicked: index out of bounds"
        );
        // Formatted panics too; and no panic, no change.
        let r = catch_panic(&rule, "j2", Path::new("x.json"), || panic!("at {}", 7));
        assert!(r.error.unwrap().message.ends_with("job panicked: at 7"));
        let ok = failed(ErrorKind::NoSpace, "m");
        assert_eq!(catch_panic(&rule, "j3", Path::new("m"), || ok.clone()), ok);
    }

    #[test]
    fn cancelled_json_failing_is_decided_by_the_cancel_flag_not_the_message() {
        let unset = AtomicBool::new(false);
        let set = AtomicBool::new(true);
        // The manifest's name in the message says "cancelled": not a cancel without the flag.
        let named = failed(
            ErrorKind::Internal,
            "cancelled.json: internal error: recording the publish journal: EIO",
        );
        assert!(!was_cancelled(&unset, &named));
        // Aborted at shutdown, whatever error the abort surfaced as: left claimed.
        let aborted = failed(ErrorKind::SourceReadFailed, "m.json: source 1: read failed");
        assert!(was_cancelled(&set, &aborted));
        let mut ok = failed(ErrorKind::Internal, "");
        ok.status = Status::Succeeded;
        ok.error = None;
        assert!(!was_cancelled(&set, &ok), "a published job is filed");
    }
}
