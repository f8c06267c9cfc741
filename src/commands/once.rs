//! `concatd once`: one manifest through the daemon's job code, result JSON on stdout.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{init_stderr_logging, load_rule};
use crate::job::{self, JobContext, Progress};
use crate::manifest::Origin;

pub fn run(config: &Path, rule_name: &str, manifest: &Path) -> anyhow::Result<i32> {
    init_stderr_logging("warn");
    let rule = match load_rule(config, rule_name) {
        Ok(rule) => rule,
        Err(code) => return Ok(code),
    };
    let rule = &rule;
    // Ctrl-C or SIGTERM cancels the job instead of killing the process, so its fully allocated
    // temporary file is removed and a result is still printed (exit 1).
    let cancel = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&cancel))?;
    }
    let progress = Progress::default();
    let ctx = JobContext {
        rule,
        job_id: job::new_job_id(),
        cancel: Some(&cancel),
        progress: Some(&progress),
        before_publish: None,
        pieces: None,
    };
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        if std::io::stderr().is_terminal() {
            s.spawn(|| show_progress(&progress, &done));
        }
        let result = job::run_from(&ctx, manifest, Origin::Given);
        done.store(true, Ordering::Relaxed);
        result
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(result.exit_code())
}

/// A bar of bytes, rate and ETA on stderr, while the job runs.
fn show_progress(progress: &Progress, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    while !done.load(Ordering::Relaxed) {
        bar.set_length(progress.total.load(Ordering::Relaxed));
        bar.set_position(progress.done.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}
