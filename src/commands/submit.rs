//! `concatd submit`: drop a manifest into a rule's folder atomically; with `--wait`, wait for its
//! result.
//!
//! The drop writes a temporary file of its own, `.NAME.<pid>.<random>.tmp` (hidden and `.tmp`, so
//! ignored by the daemon; created exclusively, so two submits of one name never share it), fsyncs
//! it and renames it to `NAME` without replacing anything: if a manifest of that name is already
//! waiting, the submit fails and the waiting manifest is untouched. The daemon moves that very file (renamed into its job folder when claimed,
//! then renamed into `done/` or `failed/`), so its inode identifies it there even when a unique
//! suffix was added to its name.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{EXIT_USAGE, load_rule};
use crate::daemon::claim::{find_filed, result_name};
use crate::daemon::watch::{DONE_DIR, FAILED_DIR, is_candidate};
use crate::result::JobResult;

pub fn run(
    config: &Path,
    rule_name: &str,
    manifest: &Path,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let rule = match load_rule(config, rule_name) {
        Ok(rule) => rule,
        Err(code) => return Ok(code),
    };
    let rule = &rule;
    let Some(name) = manifest.file_name().filter(|n| is_candidate(n)) else {
        eprintln!(
            "concatd: {} cannot be a manifest name (hidden, .tmp, .part or ~ names are ignored)",
            manifest.display()
        );
        return Ok(EXIT_USAGE);
    };
    let bytes = std::fs::read(manifest)
        .with_context(|| format!("reading manifest {}", manifest.display()))?;
    let ino = drop_atomically(&rule.watch, name, &bytes)?;
    let dropped = rule.watch.join(name);
    if !wait {
        println!("{}", dropped.display());
        return Ok(0);
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut checked = Instant::now() - LIVENESS_EVERY;
    loop {
        if let Some(result) = find_result(&rule.watch, name, ino) {
            println!("{}", serde_json::to_string_pretty(&result)?);
            return Ok(result.exit_code());
        }
        // Waiting is pointless with nobody to run the job: say so at once (and again should the
        // daemon stop while we wait). The manifest stays dropped and runs when a daemon starts.
        if checked.elapsed() >= LIVENESS_EVERY {
            if crate::inbox::live_daemon(&rule.watch).is_none()
                && find_result(&rule.watch, name, ino).is_none()
            {
                eprintln!(
                    "concatd: no daemon is watching {} (rule '{}'): {} stays dropped and runs \
                     when one starts (concatd run -c {})",
                    rule.watch.display(),
                    rule.name,
                    dropped.display(),
                    config.display()
                );
                return Ok(1);
            }
            checked = Instant::now();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "concatd: timed out after {} waiting for the result of {} (it is still queued or \
                 running; its result will appear in {}/{DONE_DIR}/ or {}/{FAILED_DIR}/)",
                humantime::format_duration(timeout.unwrap_or_default()),
                dropped.display(),
                rule.watch.display(),
                rule.watch.display()
            );
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How often `--wait` checks that a daemon still watches the folder.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// The longest file name Linux filesystems take (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// A fresh temporary name for a drop of `name`: `.NAME.<pid>.<random>.tmp`, with `NAME` cut short
/// (on a byte boundary: names are bytes) when the whole would not fit in [`NAME_MAX`].
fn temp_name(name: &OsStr, attempt: u32) -> OsString {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let tail = format!(".{}.{:016x}.tmp", std::process::id(), h.finish());
    let keep = NAME_MAX - 1 - tail.len();
    let bytes = name.as_encoded_bytes();
    let mut temp = b".".to_vec();
    temp.extend_from_slice(&bytes[..bytes.len().min(keep)]);
    temp.extend_from_slice(tail.as_bytes());
    OsString::from_vec(temp)
}

/// Write `bytes` as `<watch>/NAME` atomically; the new file's inode.
fn drop_atomically(watch: &Path, name: &OsStr, bytes: &[u8]) -> anyhow::Result<u64> {
    let target = watch.join(name);
    let mut attempt = 0;
    let (temp, mut f) = loop {
        let temp = watch.join(temp_name(name, attempt));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
        {
            Ok(f) => break (temp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", temp.display())),
        }
    };
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        drop(f);
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("writing {}", temp.display()));
    }
    let ino = f.metadata()?.ino();
    drop(f);
    let renamed = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &temp,
        rustix::fs::CWD,
        &target,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&temp);
        if e == rustix::io::Errno::EXIST {
            anyhow::bail!(
                "{} is already waiting to be taken: pick another name",
                target.display()
            );
        }
        return Err(std::io::Error::from(e))
            .with_context(|| format!("renaming into {}", target.display()));
    }
    std::fs::File::open(watch).and_then(|d| d.sync_all())?;
    Ok(ino)
}

/// The result of the manifest with inode `ino`, once it is filed.
fn find_result(watch: &Path, name: &OsStr, ino: u64) -> Option<JobResult> {
    for sub in [DONE_DIR, FAILED_DIR] {
        let dest = watch.join(sub);
        // The common case first: filed under its own name.
        let filed = match std::fs::symlink_metadata(dest.join(name)) {
            Ok(m) if m.ino() == ino => Some(name.to_owned()),
            _ => find_filed(&dest, name, ino),
        };
        if let Some(filed) = filed
            && let Ok(bytes) = std::fs::read(dest.join(result_name(&filed)))
            && let Ok(result) = serde_json::from_slice(&bytes)
        {
            return Some(result);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_temp_names_are_unique_ignored_and_fit_name_max() {
        let long = "n".repeat(NAME_MAX);
        for name in ["m.json", long.as_str()] {
            let a = temp_name(OsStr::new(name), 0);
            let b = temp_name(OsStr::new(name), 0);
            assert_ne!(a, b, "two drops of one name share a temporary file");
            for t in [&a, &b] {
                assert!(t.len() <= NAME_MAX, "{t:?}");
                assert!(!is_candidate(t), "{t:?} would be taken as a manifest");
            }
        }
    }
}
