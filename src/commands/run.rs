//! `concatd run`: the daemon in the foreground.

use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::EXIT_USAGE;
use crate::daemon::{self, Control, DaemonError};

pub fn run(config: &Path) -> anyhow::Result<i32> {
    let logs = crate::logging::init_daemon();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("concatd")
        .build()?;
    let outcome = runtime.block_on(async {
        let control = signals()?;
        anyhow::Ok(daemon::run(config, logs, control).await)
    })?;
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

/// SIGTERM/SIGINT stop the daemon, SIGHUP reloads it. Installed before the daemon starts, so a
/// signal that arrives while it sets up is not lost.
fn signals() -> std::io::Result<Control> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = CancellationToken::new();
    let (tx, reload) = tokio::sync::mpsc::unbounded_channel();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let _ = tx.send("SIGHUP");
                }
            }
        }
        stop.cancel();
    });
    Ok(Control { shutdown, reload })
}
