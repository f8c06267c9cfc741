//! Recovery of jobs a dead daemon left claimed in `<watch>/.work/`.
//!
//! # Invariant: exactly one result per manifest
//! - A manifest is in exactly one place: the watch folder (waiting), `.work/<id>/` (claimed, the
//!   folder `flock`ed while a live daemon works on it), or `done/`/`failed/` *with* its result:
//!   the result is durable in the job folder before the manifest is renamed out, and the job folder
//!   goes only after both are filed (`claim::file_result`).
//! - Before the job renames its output into place it durably records `.publish.json` in its job
//!   folder: output path, device and inode of the finished temporary file, size, BLAKE3. A rename
//!   keeps the inode, so after a crash "the output path holds that very inode" proves the job got
//!   as far as publishing: it is filed as succeeded (sidecar moved into place if the crash came
//!   between the two renames) instead of being rerun into a spurious `output_exists`.
//! - Otherwise nothing of the job is visible at the output path: its temporary files
//!   (`.concatd-<id>.tmp`, `.b3.tmp`) are removed and it is rerun under the same job id.
//!
//! A job folder whose lock cannot be taken belongs to a live daemon and is left alone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::claim::{self, ClaimError, JobDir};
use super::watch::WORK_DIR;
use crate::config::Rule;
use crate::job::PublishPoint;
use crate::result::{JobResult, Status};

/// What a job records just before publishing (`.publish.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub output: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub blake3: String,
    pub sources: u64,
    pub started_at: String,
}

/// Record `point` in the job folder `dir`, durably when `fsync`.
pub fn write_journal(
    dir: &Path,
    point: &PublishPoint,
    started_at: &str,
    fsync: bool,
) -> std::io::Result<()> {
    let meta = point.file.metadata()?;
    let journal = Journal {
        output: point.output.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: point.size,
        blake3: point.hash.to_hex().to_string(),
        sources: point.sources,
        started_at: started_at.to_owned(),
    };
    let bytes = serde_json::to_vec(&journal).map_err(std::io::Error::other)?;
    claim::write_atomic(&dir.join(claim::PUBLISH_JOURNAL), &bytes, fsync)
        .map_err(std::io::Error::other)
}

/// The job folders in `<watch>/.work/`, oldest job id (uuid v7: time-ordered) first.
pub fn list(watch: &Path) -> std::io::Result<Vec<PathBuf>> {
    let work = watch.join(WORK_DIR);
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&work) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    dirs.sort();
    Ok(dirs)
}

/// What to do with a job folder found at start.
pub enum Plan {
    /// Nothing left to do (filed already, or empty): the folder was removed.
    Gone,
    /// File this result (the job finished before the crash).
    File(JobDir, Box<JobResult>),
    /// Run the job again (temporary files already removed).
    Rerun(JobDir),
}

/// Decide what a locked, abandoned job folder needs.
pub fn assess(dir: JobDir, rule: &Rule) -> Result<Plan, ClaimError> {
    // The result is written before anything leaves the folder: resume filing.
    if let Ok(bytes) = std::fs::read(dir.result_path())
        && let Ok(result) = serde_json::from_slice::<JobResult>(&bytes)
    {
        return Ok(Plan::File(dir, Box::new(result)));
    }
    // `symlink_metadata`: a claimed symlink is a manifest to refuse (and file), whatever it
    // points to, not a missing one.
    if dir.name.is_empty() || std::fs::symlink_metadata(dir.manifest()).is_err() {
        // No manifest and no result: crashed while claiming, or after filing. Nothing to resume.
        dir.remove(false)?;
        return Ok(Plan::Gone);
    }
    if let Some(result) = published(&dir, rule) {
        return Ok(Plan::File(dir, Box::new(result)));
    }
    remove_temps(&dir, rule);
    let _ = std::fs::remove_file(dir.journal());
    Ok(Plan::Rerun(dir))
}

/// The succeeded result of a job that renamed its output into place before the crash.
fn published(dir: &JobDir, rule: &Rule) -> Option<JobResult> {
    let journal: Journal = serde_json::from_slice(&std::fs::read(dir.journal()).ok()?).ok()?;
    let meta = std::fs::symlink_metadata(&journal.output).ok()?;
    if meta.dev() != journal.dev || meta.ino() != journal.ino || meta.len() != journal.size {
        return None;
    }
    let folder = journal.output.parent()?;
    let sidecar_temp = folder.join(crate::output::sidecar_temp_name(&dir.id));
    if sidecar_temp.exists() {
        let mut sidecar = journal.output.clone().into_os_string();
        sidecar.push(".b3");
        if rule.checksum_file {
            let _ = std::fs::rename(&sidecar_temp, sidecar);
        } else {
            let _ = std::fs::remove_file(&sidecar_temp);
        }
    }
    if rule.fsync {
        let _ = claim::sync_dir(folder);
    }
    tracing::info!(
        job_id = %dir.id, manifest = %dir.name.to_string_lossy(),
        output = %journal.output.display(),
        "recovered: the output was published before the crash"
    );
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    Some(JobResult {
        status: Status::Succeeded,
        rule: rule.name.clone(),
        manifest: dir.name.to_string_lossy().into_owned(),
        job_id: dir.id.clone(),
        output: Some(journal.output.display().to_string()),
        size: Some(journal.size),
        blake3: Some(journal.blake3),
        sources: Some(journal.sources),
        write_mode: Some(rule.write_mode.resolve().as_str().to_owned()),
        started_at: journal.started_at,
        finished_at: now,
        duration_ms: 0,
        error: None,
    })
}

/// Remove the job's temporary output files, wherever its manifest says the output goes.
fn remove_temps(dir: &JobDir, rule: &Rule) {
    let folder = match std::fs::read(dir.journal())
        .ok()
        .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
    {
        Some(j) => j.output.parent().map(Path::to_path_buf),
        None => crate::manifest::Manifest::load(&dir.manifest(), crate::manifest::Origin::Claimed)
            .ok()
            .and_then(|m| {
                rule.output_root
                    .join(&m.output)
                    .parent()
                    .map(Path::to_path_buf)
            }),
    };
    if let Some(folder) = folder {
        for name in [
            crate::output::temp_name(&dir.id),
            crate::output::sidecar_temp_name(&dir.id),
        ] {
            if std::fs::remove_file(folder.join(&name)).is_ok() {
                tracing::info!(job_id = %dir.id, file = %name, "removed temporary file of the interrupted job");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{self, JobContext};

    /// The hook runs with the finished temporary file, whose inode is the one published.
    #[test]
    fn the_journal_names_the_published_inode() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "out", "data", "job"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("data/a"), b"journal").unwrap();
        let text = "log_dir: logs\nrules:\n  - name: r\n    watch: in\n    output_root: out\n    source_root: data\n";
        let rules = crate::config::parse(text, &dir.path().join("rules.yaml"), dir.path()).unwrap();
        let manifest = dir.path().join("m.json");
        std::fs::write(&manifest, r#"{"output":"o.bin","sources":["a"]}"#).unwrap();
        let job_dir = dir.path().join("job");
        let hook = |p: &PublishPoint| {
            // Not yet visible at the output path.
            assert!(!p.output.exists());
            write_journal(&job_dir, p, "t0", true)
        };
        let ctx = JobContext {
            rule: &rules.rules[0],
            job_id: job::new_job_id(),
            cancel: None,
            progress: None,
            before_publish: Some(&hook),
        };
        let result = job::run(&ctx, &manifest);
        assert!(result.succeeded(), "{result:?}");
        let journal: Journal =
            serde_json::from_slice(&std::fs::read(job_dir.join(claim::PUBLISH_JOURNAL)).unwrap())
                .unwrap();
        let out = std::fs::metadata(dir.path().join("out/o.bin")).unwrap();
        assert_eq!((journal.dev, journal.ino), (out.dev(), out.ino()));
        assert_eq!(journal.size, 7);
        assert_eq!(journal.blake3, blake3::hash(b"journal").to_hex().as_str());
        assert_eq!(result.blake3.as_deref(), Some(journal.blake3.as_str()));
    }
}
