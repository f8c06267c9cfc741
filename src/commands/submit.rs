//! `concatd submit`: drop a manifest into a rule's folder atomically; with `--wait`, wait for its
//! result.
//!
//! The drop is [`crate::inbox::drop_manifest`]: a temporary file of its own, renamed in without
//! replacing a waiting manifest. The daemon moves that very file (renamed into its job folder when
//! claimed, then renamed into `done/` or `failed/`), so its inode identifies it there even when a
//! unique suffix was added to its name.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{EXIT_USAGE, load_rule};
use crate::inbox::{DONE_DIR, FAILED_DIR, is_candidate};
use crate::inbox::{find_filed, result_name};
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
    // Read as the job will (a regular file, never blocking on a FIFO), so a path that can never
    // be a manifest is refused here, not dropped.
    let bytes = match crate::manifest::read_text(manifest, crate::manifest::Origin::Given) {
        Ok(text) => text.into_bytes(),
        Err(e) => {
            eprintln!("concatd: {e}");
            return Ok(1);
        }
    };
    let ino = crate::inbox::drop_manifest(&rule.watch, name, &bytes)?;
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
                    "concatd: no daemon is watching {} (rule '{}'): {} stays in the folder \
                     (or claimed, if a daemon took it before it stopped) and runs when one \
                     starts (concatd run -c {})",
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
