//! Uploads under a rule's S3 prefix that no job of the rule owns are aborted, so none is left
//! billing: at the daemon's start and every [`EVERY`] after.
//!
//! The prefix belongs to concatd (README, "S3 outputs"): an upload under it is either recorded in
//! a job folder of the rule (`.work/<id>/.upload`) or an orphan. Only uploads older than
//! [`GRACE`] are aborted: a job records its upload a moment after creating it, and another
//! daemon sharing the store may have just created one.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::{OutputRoot, Rule};
use crate::output::s3;
use crate::source::clients::Clients;

/// How often the daemon sweeps.
pub const EVERY: Duration = Duration::from_secs(600);
/// Uploads younger than this are never aborted by the sweep (`CONCATD_S3_ORPHAN_GRACE`, a
/// duration, overrides it: tests use it, and so may a site whose clocks disagree).
pub const GRACE: Duration = Duration::from_secs(900);

fn grace() -> Duration {
    std::env::var("CONCATD_S3_ORPHAN_GRACE")
        .ok()
        .and_then(|t| crate::config::parse_duration(&t).ok())
        .unwrap_or(GRACE)
}

/// Abort the orphaned uploads under `rule`'s prefix; returns how many were aborted.
pub fn sweep_orphans(rule: &Rule) -> Result<usize, String> {
    let OutputRoot::S3(root) = &rule.output_root else {
        return Ok(0);
    };
    let clients = Clients::for_rule(rule).map_err(|e| e.to_string())?;
    let client = clients.s3("the orphan sweep").map_err(|e| e.to_string())?;
    let owned = owned_uploads(&rule.watch.join(crate::inbox::WORK_DIR));
    let uploads = clients
        .rt()
        .block_on(s3::list_uploads(client.sdk(), &root.bucket, &root.prefix))
        .map_err(|f| f.text)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let grace = grace().as_secs() as i64;
    let mut aborted = 0;
    for u in uploads {
        if owned.contains(&u.upload_id) {
            continue;
        }
        // Without an initiation time the upload is taken as old: the store would bill it forever.
        if u.initiated.is_some_and(|t| now - t < grace) {
            continue;
        }
        match clients
            .rt()
            .block_on(s3::abort(client.sdk(), &root.bucket, &u.key, &u.upload_id))
        {
            Ok(()) => {
                tracing::info!(rule = %rule.name, key = %u.key, upload_id = %u.upload_id, "aborted an orphaned upload");
                aborted += 1;
            }
            Err(f) => {
                tracing::warn!(rule = %rule.name, key = %u.key, upload_id = %u.upload_id, error = %f.text, "could not abort an orphaned upload")
            }
        }
    }
    Ok(aborted)
}

/// Upload ids recorded in the job folders under `work`.
fn owned_uploads(work: &Path) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(work) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| super::journal::recorded_upload(&e.path().join(super::journal::FILE)))
        .collect()
}
