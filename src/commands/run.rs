//! `concatd run`: the daemon in the foreground.

use std::path::Path;

use super::EXIT_USAGE;
use crate::daemon::{self, DaemonError};

pub fn run(config: &Path) -> anyhow::Result<i32> {
    let logs = crate::logging::init_daemon();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("concatd")
        .build()?;
    let outcome = runtime.block_on(daemon::run(config, logs));
    // Jobs are done or aborted by now; do not wait for idle blocking threads.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => Ok(0),
        Err(DaemonError::Config(e)) => {
            eprintln!("concatd: {e}");
            Ok(EXIT_USAGE)
        }
        Err(e) => Err(e.into()),
    }
}
