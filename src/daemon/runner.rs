//! One queued item, start to finish, on a blocking thread: claim (or resume), run the job through
//! the same code as `concatd once`, file the result.
//!
//! Everything here runs inside a span carrying the rule's name, so the job's own events land in
//! the rule's log (see `logging`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::claim::{self, JobDir};
use super::recover::{self, Plan};
use super::watch::{DONE_DIR, FAILED_DIR};
use crate::config::Rule;
use crate::job::{self, JobContext, PublishPoint};
use crate::result::{ErrorKind, JobResult};

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
    let started_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let journal_dir = dir.path.clone();
    let hook = move |point: &PublishPoint| {
        recover::write_journal(&journal_dir, point, &started_at, rule.fsync)
    };
    let ctx = JobContext {
        rule,
        job_id: dir.id.clone(),
        cancel: Some(cancel),
        progress: None,
        before_publish: Some(&hook),
    };
    let result = job::run(&ctx, &dir.manifest());
    if cancel.load(Ordering::Relaxed) && was_cancelled(&result) {
        tracing::info!(
            job_id = %dir.id, manifest = %dir.name.to_string_lossy(),
            "cancelled at shutdown: left claimed for the next start"
        );
        return;
    }
    file(dir, rule, &result);
}

fn was_cancelled(result: &JobResult) -> bool {
    result
        .error
        .as_ref()
        .is_some_and(|e| e.kind == ErrorKind::Internal && e.message.contains("cancelled"))
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
        Ok(name) => tracing::info!(
            job_id = %id, manifest = %manifest, status = ?result.status,
            result = %format!("{sub}/{}", claim::result_name(&name).to_string_lossy()),
            "result filed"
        ),
        Err(e) => tracing::warn!(
            job_id = %id, manifest = %manifest, error = %e,
            "cannot file the result: left in .work/ for the next start"
        ),
    }
}
