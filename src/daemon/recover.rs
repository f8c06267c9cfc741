//! Recovery of jobs a dead daemon left claimed in `<watch>/.work/`.
//!
//! # The job folder's state machine
//! A job is in exactly one of these states; each transition is one step whose record is written
//! before the action it announces (synced, when the rule asks for fsync, where losing it to a
//! power failure would mislead recovery: `publishing`, the result, the filing record; the
//! `copying` and `published` records fall back to the state before them, whose recovery covers
//! theirs, so they cost no sync), so a crash anywhere leaves a state [`JobState::read`] finds
//! again, and recovery
//! ([`assess`]) is a function of that state alone — plus, for `Publishing`, the inodes at the
//! output's names, looked up relative to the output folder's descriptor, which tell which side
//! of each rename the crash fell on.
//!
//! | state | recorded as (in `.work/<id>/`) | entered by | recovery |
//! |---|---|---|---|
//! | `Claimed` | the manifest, no journal | the claim's rename | rerun |
//! | `Copying` | `.publish.json` `state: copying` (output root and path), and `.pieces` once pieces are finished | before the temporary file is created | remove the temporary sidecar; keep the temporary output when `.pieces` describes it (the rerun checks that journal against its own plan and that file, and continues in it or starts afresh), else remove it; rerun |
//! | `Publishing` | `state: publishing` + inodes of temp output and temp sidecar, overwrite, size, BLAKE3 | under the output folder's lock, before the first rename | under that lock: our output inode at the output name → finish (sidecar into place unless ours is there already), file success; otherwise remove temps, rerun |
//! | `Published` | `.published.json`, `state: published` | after both renames and the folder's fsync, still under the lock | remove the temps (the earlier files an overwrite exchanged out), file success |
//! | `ResultWritten` | `.result.json` | the result written (temp, fsync, rename) | file it |
//! | `Filing` | `.result.json` + `.filing` (where the manifest goes) | before the manifest's rename to `done/`/`failed/` | finish filing (`claim::file_result`) |
//! | `Gone` | `.filing` without `.result.json`, or no manifest at all | the result's rename into `done/`/`failed/` | remove the folder |
//!
//! The output folder's publish lock (an `flock` taken by every publish and every recovery of
//! one) makes an output and its `.b3` one unit: no other job's rename falls between the two, so
//! concurrent overwrites of one output never leave one job's bytes beside another's sidecar, and
//! the inodes recovery reads cannot change under it.
//!
//! Folders left by older daemons: a journal without `state` (written just before publishing,
//! with an absolute output path and no sidecar inode) is read as `Publishing`; the older result
//! layout (`NAME.result.json` in the job folder) is renamed by `JobDir::lock_existing`.
//!
//! # Invariant: exactly one result per manifest
//! A manifest is in exactly one place: the watch folder (waiting), `.work/<id>/` (claimed, the
//! folder `flock`ed while a live daemon works on it), or `done/`/`failed/` *with* its result.
//! A job folder whose lock cannot be taken belongs to a live daemon and is left alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::claim::{self, ClaimError, JobDir};
use super::watch::WORK_DIR;
use crate::config::Rule;
use crate::job::{JobStep, Stage};
use crate::output::{OutputTarget, Publish, Renames};
use crate::result::{JobResult, Published, ResultHead, Timing};

/// The job journal (`.publish.json`): the latest durable step of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Older daemons wrote the journal only just before publishing, without a state.
    #[serde(default = "publishing")]
    pub state: Stage,
    /// The rule's `output_root` as the job opened it; absent in older journals, whose `output`
    /// is an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_root: Option<PathBuf>,
    /// The manifest's `output`, relative to `output_root`.
    pub output: PathBuf,
    #[serde(default)]
    pub overwrite: bool,
    /// Device and inode of the temporary output (from `publishing` on).
    #[serde(default)]
    pub dev: u64,
    #[serde(default)]
    pub ino: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_ino: Option<u64>,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub blake3: String,
    #[serde(default)]
    pub sources: u64,
    pub started_at: String,
}

fn publishing() -> Stage {
    Stage::Publishing
}

impl Journal {
    /// The output's target, its folders opened relative to one another (nothing created);
    /// `None` when a folder is missing or the recorded output is no longer acceptable.
    fn target(&self) -> Option<OutputTarget> {
        let (root, rel) = match &self.output_root {
            Some(root) => (root.clone(), self.output.clone()),
            None => (
                self.output.parent()?.to_owned(),
                PathBuf::from(self.output.file_name()?),
            ),
        };
        OutputTarget::existing_folder(&root, rel.to_str()?)
            .ok()
            .flatten()
    }

    /// The absolute path of the output, as results show it.
    fn path(&self) -> PathBuf {
        match &self.output_root {
            Some(root) => root.join(&self.output),
            None => self.output.clone(),
        }
    }
}

/// Record `step` in the job folder `dir` (replacing the previous record), durably when `fsync`.
pub fn write_journal(
    dir: &Path,
    step: &JobStep,
    started_at: &str,
    fsync: bool,
) -> std::io::Result<()> {
    let renames = step.renames;
    let journal = Journal {
        state: step.stage,
        output_root: Some(step.output_root.to_owned()),
        output: PathBuf::from(step.output),
        overwrite: step.overwrite,
        dev: renames.map_or(0, |r| r.dev),
        ino: renames.map_or(0, |r| r.output_ino),
        sidecar_ino: renames.and_then(|r| r.sidecar_ino),
        size: step.size,
        blake3: step
            .hash
            .map(|h| h.to_hex().to_string())
            .unwrap_or_default(),
        sources: step.sources,
        started_at: started_at.to_owned(),
    };
    let bytes = serde_json::to_vec(&journal).map_err(std::io::Error::other)?;
    // Only `publishing` must be durable before its action (the renames). A lost `copying`
    // record leaves `Claimed`, whose recovery finds the temporary file through the manifest; a
    // lost `published` record leaves `Publishing`, whose recovery finds the renames done. Neither
    // costs a sync, and `published` goes to a file of its own so that it cannot damage the
    // durable record if power fails while it is being replaced.
    let (name, fsync) = match step.stage {
        Stage::Copying => (claim::PUBLISH_JOURNAL, false),
        Stage::Publishing => (claim::PUBLISH_JOURNAL, fsync),
        Stage::Published => (claim::PUBLISHED_RECORD, false),
    };
    crate::inbox::write_atomic(&dir.join(name), &bytes, fsync).map_err(|e| {
        // Keep the kind (a full disk is `no_space`) along with the message.
        std::io::Error::new(e.io_kind(), e)
    })
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

/// The state of a job folder, as its records say (see the table above).
#[derive(Debug)]
pub enum JobState {
    Claimed,
    Copying(Journal),
    Publishing(Journal),
    Published(Journal),
    ResultWritten(Box<JobResult>),
    /// The manifest is being (or was) renamed to the recorded destination.
    Filing {
        result: Box<JobResult>,
        dest: PathBuf,
    },
    Gone,
}

impl JobState {
    /// Read the state of the locked job folder `dir`.
    pub fn read(dir: &JobDir) -> Self {
        let record = dir.path.join(claim::FILING_RECORD);
        if let Ok(bytes) = std::fs::read(dir.result_path())
            && let Ok(result) = serde_json::from_slice::<JobResult>(&bytes)
        {
            let result = Box::new(result);
            return match std::fs::read(&record) {
                Ok(dest) => Self::Filing {
                    result,
                    dest: PathBuf::from(std::ffi::OsString::from(
                        String::from_utf8_lossy(&dest).into_owned(),
                    )),
                },
                Err(_) => Self::ResultWritten(result),
            };
        }
        // `symlink_metadata`: a claimed symlink is a manifest to refuse (and file), whatever it
        // points to, not a missing one.
        if record.exists()
            || dir.name.is_empty()
            || std::fs::symlink_metadata(dir.manifest()).is_err()
        {
            // Filed (the result left last), or crashed while claiming.
            return Self::Gone;
        }
        let read = |name| {
            std::fs::read(dir.path.join(name))
                .ok()
                .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        };
        let journal = read(claim::PUBLISHED_RECORD).or_else(|| read(claim::PUBLISH_JOURNAL));
        match journal {
            None => Self::Claimed,
            Some(j) => match j.state {
                Stage::Copying => Self::Copying(j),
                Stage::Publishing => Self::Publishing(j),
                Stage::Published => Self::Published(j),
            },
        }
    }
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

/// Decide what a locked, abandoned job folder needs, from its state alone.
pub fn assess(dir: JobDir, rule: &Rule) -> Result<Plan, ClaimError> {
    let state = JobState::read(&dir);
    tracing::debug!(job_id = %dir.id, state = ?state, "recovering");
    match state {
        JobState::Gone => {
            dir.remove(false)?;
            Ok(Plan::Gone)
        }
        JobState::ResultWritten(result) => Ok(Plan::File(dir, result)),
        JobState::Filing { result, dest } => {
            tracing::info!(job_id = %dir.id, to = %dest.display(), "resuming the filing of the manifest");
            Ok(Plan::File(dir, result))
        }
        JobState::Claimed => {
            // An older daemon wrote no journal before its temporary file: look where the
            // manifest says the output goes.
            if let Some(t) =
                crate::manifest::Manifest::load(&dir.manifest(), crate::manifest::Origin::Claimed)
                    .ok()
                    .and_then(|m| {
                        let root = rule.output_root.local()?;
                        OutputTarget::existing_folder(root, &m.output).ok()
                    })
                    .flatten()
            {
                clear_unpublished(&dir, &t);
            }
            rerun(dir)
        }
        JobState::Copying(j) => {
            if let Some(t) = j.target() {
                // The rerun creates its temporary output under the rule's output root as it is
                // now: a file kept under another root would never be reopened, nor removed.
                if j.output_root.is_some() && j.output_root.as_deref() == rule.output_root.local() {
                    clear_unpublished(&dir, &t);
                } else {
                    removed_temps(&dir, t.remove_temps(&dir.id));
                }
            }
            rerun(dir)
        }
        JobState::Publishing(j) => {
            let Some(t) = j.target() else {
                return rerun(dir);
            };
            let Ok(hash) = blake3::Hash::from_hex(&j.blake3) else {
                removed_temps(&dir, t.remove_temps(&dir.id));
                return rerun(dir);
            };
            let renames = Renames {
                dev: j.dev,
                output_ino: j.ino,
                sidecar_ino: j.sidecar_ino,
            };
            // Older journals recorded neither overwrite nor the sidecar: replace a .b3 as they
            // did, if the rule has one.
            let legacy = j.output_root.is_none();
            let how = Publish {
                overwrite: j.overwrite || legacy,
                fsync: rule.fsync,
                sidecar: j.sidecar_ino.is_some() || (legacy && rule.checksum_file),
            };
            match t.recover_publish(&dir.id, renames, &hash, how) {
                Ok(true) => {
                    let result = published(&dir, rule, &j);
                    Ok(Plan::File(dir, Box::new(result)))
                }
                Ok(false) => rerun(dir),
                Err(e) => {
                    tracing::warn!(job_id = %dir.id, error = %e, "cannot finish the interrupted publish: rerunning");
                    t.remove_temps(&dir.id);
                    rerun(dir)
                }
            }
        }
        JobState::Published(j) => {
            if let Some(t) = j.target() {
                t.remove_temps(&dir.id);
            }
            let result = published(&dir, rule, &j);
            Ok(Plan::File(dir, Box::new(result)))
        }
    }
}

/// Back to `Claimed`: the journal goes, the job runs again under its id.
fn rerun(dir: JobDir) -> Result<Plan, ClaimError> {
    let _ = std::fs::remove_file(dir.path.join(claim::PUBLISHED_RECORD));
    let _ = std::fs::remove_file(dir.journal());
    Ok(Plan::Rerun(dir))
}

/// Before a rerun of a job that never published: its temporary files go, except the temporary
/// output when a pieces journal describes it (see `job::pieces`), for the rerun to resume in.
fn clear_unpublished(dir: &JobDir, t: &OutputTarget) {
    if crate::job::resumable(&dir.path.join(crate::job::PIECES_JOURNAL)) {
        removed_temps(dir, t.remove_sidecar_temp(&dir.id));
    } else {
        removed_temps(dir, t.remove_temps(&dir.id));
    }
}

fn removed_temps(dir: &JobDir, count: usize) {
    if count > 0 {
        tracing::info!(job_id = %dir.id, files = count, "removed temporary files of the interrupted job");
    }
}

/// The succeeded result of a job whose output was published before the crash.
fn published(dir: &JobDir, rule: &Rule, journal: &Journal) -> JobResult {
    let output = journal.path();
    tracing::info!(
        job_id = %dir.id, manifest = %dir.name.to_string_lossy(), output = %output.display(),
        "recovered: the output was published before the crash"
    );
    let head = ResultHead {
        rule: rule.name.clone(),
        manifest: dir.name.to_string_lossy().into_owned(),
        job_id: dir.id.clone(),
        write_mode: Some(rule.write_mode.resolve().as_str().to_owned()),
    };
    // The journal holds the start as the result will show it; the run's length is unknown (a
    // crash came between), so it says 0 rather than counting the downtime.
    let finished = std::time::SystemTime::now();
    let started = humantime::parse_rfc3339_weak(&journal.started_at).unwrap_or(finished);
    let timing = Timing {
        started,
        finished,
        duration: std::time::Duration::ZERO,
    };
    let done = Published {
        output: output.display().to_string(),
        size: journal.size,
        blake3: journal.blake3.clone(),
        sources: journal.sources,
    };
    JobResult::published(head, timing, done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{self, JobContext};
    use std::os::unix::fs::MetadataExt;

    /// Each step is recorded before it is taken; the publishing record names the published inodes.
    #[test]
    fn the_journal_records_each_step_and_names_the_published_inodes() {
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
        let seen = std::sync::Mutex::new(Vec::new());
        let hook = |s: &JobStep| {
            // Nothing is visible at the output path before the published step.
            let visible = s.output_root.join(s.output).exists();
            assert_eq!(visible, s.stage == Stage::Published, "{:?}", s.stage);
            seen.lock().unwrap().push(s.stage);
            write_journal(&job_dir, s, "t0", true)
        };
        let ctx = JobContext {
            rule: &rules.rules[0],
            job_id: job::new_job_id(),
            cancel: None,
            progress: None,
            before_publish: Some(&hook),
            pieces: None,
        };
        let result = job::run(&ctx, &manifest);
        assert!(result.succeeded(), "{result:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            [Stage::Copying, Stage::Publishing, Stage::Published]
        );
        let read = |name| -> Journal {
            serde_json::from_slice(&std::fs::read(job_dir.join(name)).unwrap()).unwrap()
        };
        assert_eq!(read(claim::PUBLISH_JOURNAL).state, Stage::Publishing);
        let journal = read(claim::PUBLISHED_RECORD);
        let out = std::fs::metadata(dir.path().join("out/o.bin")).unwrap();
        let b3 = std::fs::metadata(dir.path().join("out/o.bin.b3")).unwrap();
        assert_eq!(journal.state, Stage::Published);
        assert_eq!((journal.dev, journal.ino), (out.dev(), out.ino()));
        assert_eq!(journal.sidecar_ino, Some(b3.ino()));
        assert_eq!(journal.output, Path::new("o.bin"));
        assert_eq!(journal.size, 7);
        assert_eq!(journal.blake3, blake3::hash(b"journal").to_hex().as_str());
        assert_eq!(result.blake3.as_deref(), Some(journal.blake3.as_str()));
    }

    /// Each recorded state is read back as itself, the latest record winning.
    #[test]
    fn job_folder_states_are_read_from_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        std::fs::write(watch.join("m.json"), "{}").unwrap();
        let job = claim::claim(watch, std::ffi::OsStr::new("m.json"), "j1")
            .unwrap()
            .unwrap();
        let state = |job: &JobDir| format!("{:?}", JobState::read(job));
        assert_eq!(state(&job), "Claimed");
        let journal = |stage: &str| {
            format!(r#"{{"state":"{stage}","output_root":"/o","output":"x","started_at":"t"}}"#)
        };
        let write = |name: &str, text: &str| std::fs::write(job.path.join(name), text).unwrap();
        write(claim::PUBLISH_JOURNAL, &journal("copying"));
        assert!(state(&job).starts_with("Copying("));
        write(claim::PUBLISH_JOURNAL, &journal("publishing"));
        assert!(state(&job).starts_with("Publishing("));
        write(claim::PUBLISHED_RECORD, &journal("published"));
        assert!(state(&job).starts_with("Published("));
        let result = r#"{"status":"succeeded","rule":"r","manifest":"m.json","job_id":"j1","started_at":"","finished_at":"","duration_ms":0}"#;
        write(claim::JOB_RESULT, result);
        assert!(state(&job).starts_with("ResultWritten("));
        write(claim::FILING_RECORD, "/w/done/m.json");
        assert!(state(&job).starts_with("Filing {"));
        std::fs::remove_file(job.result_path()).unwrap();
        assert_eq!(state(&job), "Gone");
    }

    /// A journal of an older daemon (no state, absolute output) still reads as publishing.
    #[test]
    fn an_older_journal_reads_as_publishing() {
        let j: Journal = serde_json::from_str(
            r#"{"output":"/o/p.bin","dev":1,"ino":2,"size":3,"blake3":"x","sources":1,"started_at":"t"}"#,
        )
        .unwrap();
        assert_eq!(j.state, Stage::Publishing);
        assert_eq!(j.path(), Path::new("/o/p.bin"));
        assert_eq!(j.sidecar_ino, None);
    }
}
