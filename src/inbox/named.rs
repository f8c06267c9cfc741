//! Manifests named after their job: the API drops `api-<job id>.json` (or `.yaml`), and the claim
//! gives the job the id its name carries, so the id the API answers with is the id of the result.
//!
//! A name only proposes an id. The claim takes it only when no job folder of that id exists and
//! no result is filed under that name (see [`crate::daemon::claim::claim`]): a user who drops a
//! file of such a name twice gets a fresh id the second time, so ids stay unique.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use super::{DONE_DIR, FAILED_DIR, RESULT_SUFFIX, WORK_DIR, result_name};
use crate::result::JobResult;

const PREFIX: &str = "api-";

/// Whether `id` has the shape of a job id (`uuid v7`, 32 lowercase hex digits): only such ids
/// are looked up, so an id from a URL can never name another path.
pub fn is_job_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The name the API drops a manifest of job `id` under; `yaml` picks the extension the job
/// reads it by.
pub fn api_name(id: &str, yaml: bool) -> OsString {
    let ext = if yaml { "yaml" } else { "json" };
    format!("{PREFIX}{id}.{ext}").into()
}

/// The job id a manifest's name proposes (`api-<id>.json|yaml`), if it is such a name.
pub fn proposed_id(name: &OsStr) -> Option<&str> {
    let s = name.to_str()?;
    let rest = s.strip_prefix(PREFIX)?;
    let id = rest
        .strip_suffix(".json")
        .or_else(|| rest.strip_suffix(".yaml"))?;
    is_job_id(id).then_some(id)
}

/// Whether a result is already filed under `name` in `done/` or `failed/` (the name was used).
pub fn filed_under(watch: &Path, name: &OsStr) -> bool {
    [DONE_DIR, FAILED_DIR]
        .iter()
        .any(|sub| watch.join(sub).join(result_name(name)).exists())
}

/// Where a job stands, as its rule's folder shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Its manifest waits in the folder to be claimed (or is claimed while no daemon runs).
    Waiting,
    /// Claimed by a live daemon.
    Running,
    /// Filed, with its result.
    Finished(Box<JobResult>),
}

/// The state of job `id` in `watch`, if the folder knows it: its API-named manifest waiting, its
/// job folder in `.work/`, or its result filed. Checked in the order a manifest travels (folder,
/// `.work/`, `done/`/`failed/`), so a job moving on while it is looked up is still found.
pub fn job_state(watch: &Path, id: &str) -> Option<JobState> {
    if !is_job_id(id) {
        return None;
    }
    let names = [api_name(id, false), api_name(id, true)];
    if names
        .iter()
        .any(|n| std::fs::symlink_metadata(watch.join(n)).is_ok_and(|m| m.is_file()))
    {
        return Some(JobState::Waiting);
    }
    if watch.join(WORK_DIR).join(id).is_dir() {
        return Some(if super::live_daemon(watch).is_some() {
            JobState::Running
        } else {
            JobState::Waiting
        });
    }
    for sub in [DONE_DIR, FAILED_DIR] {
        let dest = watch.join(sub);
        for n in &names {
            if let Some(r) = read_result(&dest.join(result_name(n)), id) {
                return Some(JobState::Finished(Box::new(r)));
            }
        }
        // Filed with a suffix (its name was taken in `dest`): `api-<id>-N.ext.result.json`.
        let stem = format!("{PREFIX}{id}-");
        let Ok(entries) = std::fs::read_dir(&dest) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let n = e.file_name();
            let b = n.as_encoded_bytes();
            if b.starts_with(stem.as_bytes())
                && b.ends_with(RESULT_SUFFIX.as_bytes())
                && let Some(r) = read_result(&e.path(), id)
            {
                return Some(JobState::Finished(Box::new(r)));
            }
        }
    }
    // Filed in the moment between the checks above: look once more.
    if watch.join(WORK_DIR).join(id).is_dir() {
        return Some(JobState::Running);
    }
    None
}

fn read_result(path: &Path, id: &str) -> Option<JobResult> {
    let r: JobResult = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (r.job_id == id).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_propose_ids_only_in_their_exact_shape() {
        let id = crate::job::new_job_id();
        assert!(is_job_id(&id), "{id}");
        assert_eq!(proposed_id(&api_name(&id, false)), Some(id.as_str()));
        assert_eq!(proposed_id(&api_name(&id, true)), Some(id.as_str()));
        for bad in [
            format!("api-{id}.yml"),
            format!("api-{}.json", id.to_uppercase()),
            format!("api-{id}x.json"),
            format!("api-../{id}.json"),
            format!("x-{id}.json"),
            "api-.json".to_owned(),
        ] {
            assert_eq!(proposed_id(OsStr::new(&bad)), None, "{bad}");
        }
        assert!(!is_job_id("../../etc/passwd0000000000000000"));
    }
}
