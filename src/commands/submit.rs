//! `concatd submit`: drop a manifest into a rule's folder atomically; with `--wait`, wait for its
//! result.
//!
//! The drop writes `.NAME.tmp` (ignored by the daemon), fsyncs it and renames it to `NAME` without
//! replacing anything. The daemon moves that very file (renamed into its job folder when claimed,
//! then renamed into `done/` or `failed/`), so its inode identifies it there even when a unique
//! suffix was added to its name.

use std::ffi::OsStr;
use std::io::Write;
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
    loop {
        if let Some(result) = find_result(&rule.watch, name, ino) {
            println!("{}", serde_json::to_string_pretty(&result)?);
            return Ok(result.exit_code());
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

/// Write `bytes` as `<watch>/NAME` atomically; the new file's inode.
fn drop_atomically(watch: &Path, name: &OsStr, bytes: &[u8]) -> anyhow::Result<u64> {
    let mut temp_name = OsStr::new(".").to_owned();
    temp_name.push(name);
    temp_name.push(".tmp");
    let temp = watch.join(&temp_name);
    let target = watch.join(name);
    let mut f =
        std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
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
