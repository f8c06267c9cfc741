//! Claiming a manifest and filing it away with its result.
//!
//! A claim is an atomic rename of `<watch>/NAME` into a job folder `<watch>/.work/<job id>/NAME`,
//! made before any work: of two daemons (or two events) racing for one manifest exactly one rename
//! succeeds, the other finds the name gone. The job folder is `flock`ed by the daemon working on it
//! for as long as it does; the kernel drops the lock when the process dies, which is how recovery
//! tells an abandoned job from one another live daemon is running.
//!
//! Filing ([`file_result`]) keeps "one result per manifest" across crashes; each step is durable
//! (when the rule asks for fsync) before the next:
//! 1. the result is written to `.work/<id>/.result.json` (temp file, fsync, rename; a short fixed
//!    name, so that it fits whatever the manifest's name: see [`JOB_RESULT`]);
//! 2. `D` is picked, `NAME` or the first free `NAME` with a suffix (`stem-1.ext`…), shortened
//!    when `D.result.json` would not fit in a file name (see [`filed_name`]), and recorded
//!    in `.work/<id>/.filing` (the daemon's own files start with `.`, which no manifest's name
//!    can: see [`PUBLISH_JOURNAL`]); the manifest is renamed to `done/D` (or `failed/D`) without
//!    replacing anything (`RENAME_NOREPLACE`: if `D` was taken meanwhile, the next one is tried);
//! 3. the result is renamed to `done/D.result.json`;
//! 4. the job folder is removed.
//!
//! Recovery (`recover`) resumes from whichever step a crash interrupted: a result still in the job
//! folder is filed — beside the manifest's recorded new name if the manifest already left.
//! (Renames, not hard links: with `fs.protected_hardlinks` a service user may not link a
//! manifest another user dropped.)

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use super::watch::WORK_DIR;
#[cfg(test)]
use crate::inbox::NAME_MAX;
#[cfg(test)]
use crate::inbox::suffixed;
use crate::inbox::{RESULT_SUFFIX, filed_name, io, result_name, sync_dir, write_atomic};
use crate::result::JobResult;

/// The job's journal: its latest durable step (copying, publishing, published; see `recover`).
/// The daemon's own files in a job folder start with `.`: the watcher never takes such a name,
/// so no claimed manifest can have it.
pub const PUBLISH_JOURNAL: &str = ".publish.json";

/// The record that the job's output is published (`state: published`; see `recover`). A file of
/// its own, written without fsync: losing it falls back to the durable `publishing` journal,
/// never damages it.
pub const PUBLISHED_RECORD: &str = ".published.json";

/// Where the manifest is being filed (step 2): the full path it is renamed to.
pub const FILING_RECORD: &str = ".filing";

/// The result waiting in a job folder to be filed (step 1). Not `NAME.result.json`: a manifest's
/// name may be as long as a file name can be (255 bytes), leaving no room for a suffix.
pub const JOB_RESULT: &str = ".result.json";

/// Why a claim or filing failed: the watch folder's bookkeeping error.
pub type ClaimError = crate::inbox::InboxError;

/// A job folder this process holds locked.
pub struct JobDir {
    pub id: String,
    pub path: PathBuf,
    /// The manifest's name (as dropped).
    pub name: OsString,
    lock: File,
}

impl JobDir {
    /// The claimed manifest.
    pub fn manifest(&self) -> PathBuf {
        self.path.join(&self.name)
    }

    /// Where the result waits before it is filed.
    pub fn result_path(&self) -> PathBuf {
        self.path.join(JOB_RESULT)
    }

    /// The publish journal of this job.
    pub fn journal(&self) -> PathBuf {
        self.path.join(PUBLISH_JOURNAL)
    }

    /// Lock an existing job folder; `Ok(None)` when another live process holds it or it is gone.
    pub fn lock_existing(path: &Path) -> Result<Option<Self>, ClaimError> {
        let lock = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("opening job folder", path)(e)),
        };
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Ok(None);
        }
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The manifest is the entry that is none of the daemon's own files (their names start
        // with `.`, which no manifest's can; temp files end in `.tmp`, which no manifest's can
        // either). A folder left by an older daemon may hold its result as `NAME.result.json`
        // instead of `.result.json`: then, of two such entries, the shorter is the manifest, and
        // once the manifest has left (a filing record exists) the name is the result's without
        // its suffix; that result is renamed to `.result.json` below.
        let mut name = None;
        let mut result = None;
        let mut filing = false;
        let mut new_result = false;
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            // Removed by its owner between our open and our lock: nothing left to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("listing job folder", path)(e)),
        };
        for entry in entries {
            let n = entry.map_err(io("listing job folder", path))?.file_name();
            let s = n.to_string_lossy();
            if s == FILING_RECORD {
                filing = true;
                continue;
            }
            if s == JOB_RESULT {
                new_result = true;
                continue;
            }
            if s == PUBLISH_JOURNAL || s.starts_with('.') || s.ends_with(".tmp") {
                continue;
            }
            // Of NAME and NAME.result.json, the shorter is the manifest.
            if name.as_ref().is_none_or(|m: &OsString| n.len() < m.len()) {
                result = name.replace(n);
            } else {
                result = Some(n);
            }
        }
        if !new_result {
            // An older daemon's layout: its result, if any, to `.result.json`.
            if filing
                && result.is_none()
                && let Some(only) = name.take()
            {
                let bytes = only.as_encoded_bytes();
                name = Some(match bytes.strip_suffix(RESULT_SUFFIX.as_bytes()) {
                    Some(stem) => OsString::from_vec(stem.to_vec()),
                    None => only.clone(),
                });
                result = Some(only);
            }
            if let Some(old) = result {
                let to = path.join(JOB_RESULT);
                std::fs::rename(path.join(&old), &to).map_err(io("renaming result", &to))?;
                new_result = true;
            }
        }
        if name.is_none()
            && new_result
            && let Ok(bytes) = std::fs::read(path.join(JOB_RESULT))
            && let Ok(r) = serde_json::from_slice::<JobResult>(&bytes)
        {
            // The manifest has left: its name (for the log) is the one the result records.
            name = Some(r.manifest.into());
        }
        Ok(Some(Self {
            id,
            path: path.to_owned(),
            name: name.unwrap_or_default(),
            lock,
        }))
    }

    /// Remove the job folder and everything in it (the lock goes with the handle).
    pub fn remove(self, fsync: bool) -> Result<(), ClaimError> {
        std::fs::remove_dir_all(&self.path).map_err(io("removing job folder", &self.path))?;
        if fsync && let Some(work) = self.path.parent() {
            sync_dir(work)?;
        }
        drop(self.lock);
        Ok(())
    }
}

/// Claim `<watch>/NAME` for job `id`: `Ok(None)` when it is gone (someone else claimed it).
pub fn claim(watch: &Path, name: &OsStr, id: &str) -> Result<Option<JobDir>, ClaimError> {
    let work = watch.join(WORK_DIR);
    let from = watch.join(name);
    // Twice at most: a second daemon's recovery may remove our job folder while it is still empty
    // (between mkdir and rename); then the manifest is still there and we try again.
    // A name made by the API carries the id the API answered with: take it when it is still
    // unused (no job folder of that id, created exclusively here; no result filed under the
    // name), else a fresh one, so ids stay unique even when a user reuses such a name.
    let proposed = crate::inbox::proposed_id(name)
        .filter(|_| !crate::inbox::filed_under(watch, name))
        .map(|p| {
            let path = work.join(p);
            match std::fs::create_dir_all(&work).and_then(|()| std::fs::create_dir(&path)) {
                Ok(()) => Ok(Some(p.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(io("creating job folder", &path)(e)),
            }
        })
        .transpose()?
        .flatten();
    for attempt in 0..3 {
        let id = match (attempt, &proposed) {
            (0, Some(p)) => p.clone(),
            (0, None) => id.to_owned(),
            _ => crate::job::new_job_id(),
        };
        let path = work.join(&id);
        std::fs::create_dir_all(&path).map_err(io("creating job folder", &path))?;
        let Some(mut dir) = JobDir::lock_existing(&path)? else {
            continue;
        };
        dir.name = name.to_owned();
        match std::fs::rename(&from, dir.manifest()) {
            Ok(()) => return Ok(Some(dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_dir(&path);
                if std::fs::symlink_metadata(&from).is_err() {
                    return Ok(None);
                }
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                return Err(io("claiming manifest", &from)(e));
            }
        }
    }
    Ok(None)
}

/// File a finished job: result first into the job folder, then manifest and result into `dest`
/// (`done/` or `failed/`), then the job folder removed. Returns the name used in `dest`.
/// Also resumes a filing a crash interrupted (the result may already be written).
pub fn file_result(
    dir: JobDir,
    dest: &Path,
    result: &JobResult,
    fsync: bool,
) -> Result<OsString, ClaimError> {
    let result_path = dir.result_path();
    if !result_path.exists() {
        let mut json = serde_json::to_vec_pretty(result).expect("result serializes");
        json.push(b'\n');
        write_atomic(&result_path, &json, fsync)?;
        crate::crash::point("after-result");
    }
    let manifest = dir.manifest();
    let record = dir.path.join(FILING_RECORD);
    let (dest, filed): (PathBuf, OsString) =
        if !dir.name.is_empty() && manifest.symlink_metadata().is_ok() {
            std::fs::create_dir_all(dest).map_err(io("creating", dest))?;
            let mut n = 0;
            loop {
                let d = filed_name(&dir.name, n);
                n += 1;
                let to = dest.join(&d);
                if to.symlink_metadata().is_ok() || dest.join(result_name(&d)).exists() {
                    continue;
                }
                write_atomic(&record, to.as_os_str().as_encoded_bytes(), fsync)?;
                let moved = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &manifest,
                    rustix::fs::CWD,
                    &to,
                    rustix::fs::RenameFlags::NOREPLACE,
                );
                match moved {
                    Ok(()) => {
                        crate::crash::point("mid-filing");
                        break (dest.to_owned(), d);
                    }
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(e) => return Err(io("filing manifest", &to)(e.into())),
                }
            }
        } else {
            // Resumed after a crash that came after the manifest was moved: it went where recorded.
            let to = PathBuf::from(OsString::from_vec(
                std::fs::read(&record).map_err(io("reading filing record", &record))?,
            ));
            match (to.parent(), to.file_name()) {
                (Some(p), Some(n)) => (p.to_owned(), n.to_owned()),
                _ => {
                    return Err(io("reading filing record", &record)(
                        std::io::ErrorKind::InvalidData.into(),
                    ));
                }
            }
        };
    let dest = dest.as_path();
    let final_result = dest.join(result_name(&filed));
    std::fs::rename(&result_path, &final_result).map_err(io("filing result", &final_result))?;
    if fsync {
        sync_dir(dest)?;
    }
    crate::crash::point("after-filing");
    dir.remove(fsync)?;
    Ok(filed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_keep_the_extension() {
        assert_eq!(suffixed(OsStr::new("a.json"), 0), "a.json");
        assert_eq!(suffixed(OsStr::new("a.json"), 2), "a-2.json");
        assert_eq!(suffixed(OsStr::new("a.b.yaml"), 1), "a.b-1.yaml");
        assert_eq!(suffixed(OsStr::new("plain"), 1), "plain-1");
    }

    #[test]
    fn claim_is_exclusive_and_filing_adds_a_suffix_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        let done = watch.join("done");
        std::fs::create_dir(&done).unwrap();
        std::fs::write(done.join("m.json"), "old").unwrap();
        std::fs::write(done.join("m.json.result.json"), "old").unwrap();
        std::fs::write(watch.join("m.json"), "{}").unwrap();
        let job = claim(watch, OsStr::new("m.json"), "j1").unwrap().unwrap();
        assert!(claim(watch, OsStr::new("m.json"), "j2").unwrap().is_none());
        // A second lock on a held job folder is refused.
        assert!(JobDir::lock_existing(&job.path).unwrap().is_none());
        let result: JobResult = serde_json::from_str(
            r#"{"status":"failed","rule":"r","manifest":"m.json","job_id":"j1","started_at":"","finished_at":"","duration_ms":0}"#,
        )
        .unwrap();
        let filed = file_result(job, &done, &result, true).unwrap();
        assert_eq!(filed, "m-1.json");
        assert_eq!(
            std::fs::read_to_string(done.join("m-1.json")).unwrap(),
            "{}"
        );
        let back: JobResult =
            serde_json::from_slice(&std::fs::read(done.join("m-1.json.result.json")).unwrap())
                .unwrap();
        assert_eq!(back, result);
        assert_eq!(std::fs::read_dir(watch.join(WORK_DIR)).unwrap().count(), 0);
    }

    /// An API-named manifest gives its job the id it carries, once: the same name dropped again
    /// (a user copying it, or a job folder of that id already there) gets a fresh id.
    #[test]
    fn api_names_give_their_id_once() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        let done = watch.join("done");
        std::fs::create_dir(&done).unwrap();
        let id = crate::job::new_job_id();
        let name = crate::inbox::api_name(&id, false);
        std::fs::write(watch.join(&name), "{}").unwrap();
        let job = claim(watch, &name, "fresh1").unwrap().unwrap();
        assert_eq!(job.id, id);
        let result: JobResult = serde_json::from_str(&format!(
            r#"{{"status":"failed","rule":"r","manifest":"m","job_id":"{id}","started_at":"","finished_at":"","duration_ms":0}}"#
        ))
        .unwrap();
        file_result(job, &done, &result, false).unwrap();
        std::fs::write(watch.join(&name), "{}").unwrap();
        let again = claim(watch, &name, "fresh2").unwrap().unwrap();
        assert_eq!(again.id, "fresh2", "a filed name's id is not reused");
        // A job folder of the proposed id exists: not shared.
        let other = crate::job::new_job_id();
        let other_name = crate::inbox::api_name(&other, true);
        std::fs::create_dir_all(watch.join(WORK_DIR).join(&other)).unwrap();
        std::fs::write(watch.join(&other_name), "{}").unwrap();
        let third = claim(watch, &other_name, "fresh3").unwrap().unwrap();
        assert_eq!(third.id, "fresh3");
    }

    #[test]
    fn manifests_named_like_the_daemons_files_keep_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        let done = watch.join("done");
        for (name, id) in [("filing", "j1"), ("publish.json", "j2")] {
            std::fs::write(watch.join(name), name).unwrap();
            let job = claim(watch, OsStr::new(name), id).unwrap().unwrap();
            // The journal a job writes before publishing lands beside the manifest.
            write_atomic(&job.journal(), b"journal", false).unwrap();
            // A crash here: the folder is found again by name.
            let path = job.path.clone();
            drop(job);
            let job = JobDir::lock_existing(&path).unwrap().unwrap();
            assert_eq!(job.name, name);
            let result: JobResult = serde_json::from_str(&format!(
                r#"{{"status":"succeeded","rule":"r","manifest":"{name}","job_id":"{id}","started_at":"","finished_at":"","duration_ms":0}}"#
            ))
            .unwrap();
            assert_eq!(file_result(job, &done, &result, false).unwrap(), name);
            assert_eq!(std::fs::read_to_string(done.join(name)).unwrap(), name);
        }
    }

    #[test]
    fn long_manifest_names_are_filed_under_names_that_fit() {
        for name in [
            "a.json".to_owned(),
            format!("{}.json", "a".repeat(238)),
            format!("{}.json", "a".repeat(245)),
            format!("{}.yaml", "\u{e9}".repeat(125)),
            "b".repeat(255),
        ] {
            let name = OsStr::new(&name);
            let mut seen = std::collections::HashSet::new();
            for n in 0..3 {
                let d = filed_name(name, n);
                assert!(result_name(&d).len() <= NAME_MAX, "{d:?}");
                assert!(d.to_str().is_some(), "a UTF-8 name stays UTF-8: {d:?}");
                assert!(seen.insert(d.clone()), "{d:?} twice");
                let ext = Path::new(name).extension();
                assert_eq!(Path::new(&d).extension(), ext, "{d:?}");
                if result_name(&suffixed(name, n)).len() <= NAME_MAX {
                    assert_eq!(d, suffixed(name, n));
                }
            }
        }
    }

    /// A 250-byte name, crashed after each step of filing: one result every time.
    #[test]
    fn long_manifest_names_recover_at_each_step_of_filing() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        let done = watch.join("done");
        std::fs::create_dir(&done).unwrap();
        let name = format!("{}.json", "a".repeat(245));
        let result: JobResult = serde_json::from_str(&format!(
            r#"{{"status":"succeeded","rule":"r","manifest":"{name}","job_id":"j","started_at":"","finished_at":"","duration_ms":0}}"#
        ))
        .unwrap();
        let json = serde_json::to_vec(&result).unwrap();
        for (step, id) in ["result written", "manifest moved", "result moved"]
            .iter()
            .zip(["j1", "j2", "j3"])
        {
            std::fs::write(watch.join(&name), *step).unwrap();
            let job = claim(watch, OsStr::new(&name), id).unwrap().unwrap();
            let path = job.path.clone();
            write_atomic(&job.result_path(), &json, false).unwrap();
            let filed = filed_name(OsStr::new(&name), 0);
            let mut filed_as = suffixed(&filed, 0);
            if *step != "result written" {
                // By hand, as `file_result` does, up to the crash.
                let mut n = 0;
                while done.join(&filed_as).exists() {
                    n += 1;
                    filed_as = filed_name(OsStr::new(&name), n);
                }
                let to = done.join(&filed_as);
                write_atomic(
                    &path.join(FILING_RECORD),
                    to.as_os_str().as_encoded_bytes(),
                    false,
                )
                .unwrap();
                std::fs::rename(job.manifest(), &to).unwrap();
            }
            if *step == "result moved" {
                std::fs::rename(job.result_path(), done.join(result_name(&filed_as))).unwrap();
            }
            drop(job);
            let job = JobDir::lock_existing(&path).unwrap().unwrap();
            if *step == "result moved" {
                // Nothing left to file: recovery removes the folder.
                assert!(!job.result_path().exists());
                job.remove(false).unwrap();
                continue;
            }
            assert_eq!(job.name, OsStr::new(&name), "{step}");
            let filed = file_result(job, &done, &result, false).unwrap();
            assert_eq!(
                std::fs::read_to_string(done.join(&filed)).unwrap(),
                *step,
                "{step}"
            );
            let back: JobResult =
                serde_json::from_slice(&std::fs::read(done.join(result_name(&filed))).unwrap())
                    .unwrap();
            assert_eq!(back.manifest, name);
            assert!(!path.exists());
        }
        let mut names: Vec<_> = std::fs::read_dir(&done)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 6, "{names:?}");
        for pair in names.chunks(2) {
            assert_eq!(result_name(&pair[0]), pair[1]);
        }
    }

    /// A folder left by an older daemon, which kept the result as `NAME.result.json`.
    #[test]
    fn filing_resumes_after_the_manifest_moved() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path();
        let done = watch.join("done");
        std::fs::create_dir(&done).unwrap();
        let job = watch.join(WORK_DIR).join("j1");
        std::fs::create_dir_all(&job).unwrap();
        // A manifest whose own name ends in .result.json, to make the name detection work.
        let result = r#"{"status":"succeeded","rule":"r","manifest":"x.result.json","job_id":"j1","started_at":"","finished_at":"","duration_ms":0}"#;
        std::fs::write(job.join("x.result.json.result.json"), result).unwrap();
        std::fs::write(
            job.join(FILING_RECORD),
            done.join("x-3.result.json").as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        std::fs::write(done.join("x-3.result.json"), "{}").unwrap();
        let dir = JobDir::lock_existing(&job).unwrap().unwrap();
        assert_eq!(dir.name, "x.result.json");
        let parsed: JobResult = serde_json::from_str(result).unwrap();
        let filed = file_result(dir, &done, &parsed, false).unwrap();
        assert_eq!(filed, "x-3.result.json");
        assert_eq!(
            std::fs::read_to_string(done.join("x-3.result.json.result.json")).unwrap(),
            result
        );
        assert!(!job.exists());
    }
}
