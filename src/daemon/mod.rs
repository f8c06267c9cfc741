//! `concatd run`: the daemon.
//!
//! One task per rule ([`queue::RuleTask`]) fed by that rule's folder watch ([`watch`]); jobs run
//! on blocking threads ([`runner`]), claimed by rename ([`claim`]) and resumed after a crash
//! ([`recover`]). The main task owns the set of rules: it reloads them on SIGHUP or an edit of
//! the rules file ([`reload`]) and shuts down on SIGTERM/SIGINT: stop claiming, give running jobs
//! `shutdown_grace`, then abort them (their temporary files are removed, their manifests stay in
//! `.work/` for the next start).

pub mod claim;
pub mod queue;
pub mod recover;
mod reload;
pub mod runner;
pub mod watch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, Rule, Rules};
use crate::logging::RuleLogs;
use queue::{RuleTask, SharedRule};
use watch::{DONE_DIR, FAILED_DIR, FolderWatch, WORK_DIR, WatchError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rule {rule}: {source}")]
    Watch {
        rule: String,
        #[source]
        source: WatchError,
    },
    #[error("rule {rule}: cannot create {folder}: {source}")]
    Folder {
        rule: String,
        folder: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rule {rule}: {source}")]
    Presence {
        rule: String,
        #[source]
        source: crate::inbox::InboxError,
    },
    #[error("log folder: {0}")]
    Log(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

/// How the daemon is told to stop or reload. `concatd run` feeds these from SIGTERM/SIGINT and
/// SIGHUP; a test or an embedding program can drive the daemon in-process the same way.
pub struct Control {
    /// Cancelled: stop taking manifests, finish or abort running jobs, return.
    pub shutdown: CancellationToken,
    /// Each message: reload the rules file (the reason, for the log).
    pub reload: UnboundedReceiver<&'static str>,
}

/// A running rule.
struct RuleHandle {
    rule: SharedRule,
    stop: CancellationToken,
    task: JoinHandle<()>,
    _watch: FolderWatch,
    /// Tells `status` and `submit --wait` that a live daemon watches the folder.
    _presence: crate::inbox::Presence,
}

/// The daemon's state, owned by its main task.
struct Daemon {
    rules: Rules,
    running: HashMap<String, RuleHandle>,
    /// Tasks of removed rules, finishing their running jobs.
    retiring: Vec<JoinHandle<()>>,
    global: Arc<Semaphore>,
    abort: Arc<AtomicBool>,
    logs: RuleLogs,
    /// The rules as the API sees them, replaced on reload.
    shared: crate::api::SharedRules,
}

impl Daemon {
    /// Start watching for `rule` (its folder watch is armed when this returns).
    fn start_rule(&mut self, rule: &Rule) -> Result<(), DaemonError> {
        for sub in [WORK_DIR, DONE_DIR, FAILED_DIR] {
            std::fs::create_dir_all(rule.watch.join(sub)).map_err(|source| {
                DaemonError::Folder {
                    rule: rule.name.clone(),
                    folder: rule.watch.join(sub).display().to_string(),
                    source,
                }
            })?;
        }
        let presence = crate::inbox::announce(&rule.watch).map_err(|e| DaemonError::Presence {
            rule: rule.name.clone(),
            source: e,
        })?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let folder_watch = watch::start(&rule.watch, rule.poll_interval, tx).map_err(|source| {
            DaemonError::Watch {
                rule: rule.name.clone(),
                source,
            }
        })?;
        let shared: SharedRule = Arc::new(RwLock::new(Arc::new(rule.clone())));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            RuleTask {
                rule: shared.clone(),
                notices: rx,
                global: self.global.clone(),
                abort: self.abort.clone(),
                stop: stop.clone(),
            }
            .run(),
        );
        if matches!(rule.output_root, crate::config::OutputRoot::S3(_)) {
            tokio::spawn(sweep_orphans(shared.clone(), stop.clone()));
        }
        tracing::info!(rule = %rule.name, folder = %rule.watch.display(), "watching");
        self.running.insert(
            rule.name.clone(),
            RuleHandle {
                rule: shared,
                stop,
                task,
                _watch: folder_watch,
                _presence: presence,
            },
        );
        Ok(())
    }

    /// Stop taking manifests for `name`; its running jobs finish.
    fn retire_rule(&mut self, name: &str) {
        if let Some(h) = self.running.remove(name) {
            h.stop.cancel();
            self.retiring.push(h.task);
        }
    }

    /// Stop claiming everywhere, give running jobs the grace period, then abort them.
    async fn shutdown(mut self) {
        let grace = self.rules.shutdown_grace;
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.retire_rule(&name);
        }
        let mut tasks = std::mem::take(&mut self.retiring);
        let all = async {
            for t in &mut tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "jobs still running after the grace period: aborting them"
            );
            self.abort.store(true, Ordering::Relaxed);
            // Skip the tasks the timed-out wait already saw finish: polling a handle again after
            // it returned its output panics (seen with two rules, one idle, one past the grace).
            for t in tasks.into_iter().filter(|t| !t.is_finished()) {
                let _ = t.await;
            }
        }
        tracing::info!("stopped");
        self.logs.close();
    }
}

/// An S3 rule's uploads that no job owns are aborted at start and every
/// [`crate::job::upload::sweep_orphans`]'s interval after, until the rule stops.
async fn sweep_orphans(rule: SharedRule, stop: CancellationToken) {
    let every = crate::job::upload::SWEEP_EVERY;
    loop {
        let current = rule.read().expect("rule lock").clone();
        let span = tracing::info_span!("rule", rule = %current.name);
        let swept = tokio::task::spawn_blocking(move || {
            span.in_scope(|| crate::job::upload::sweep_orphans(&current))
        })
        .await;
        match swept {
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the sweep of orphaned uploads failed; next try later")
            }
            Ok(Ok(n)) if n > 0 => tracing::info!(aborted = n, "orphaned uploads aborted"),
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Run the daemon on the rules file at `path` until `control.shutdown` is cancelled.
pub async fn run(path: &Path, logs: RuleLogs, mut control: Control) -> Result<(), DaemonError> {
    let rules = config::load(path)?;
    logs.configure(&rules).map_err(DaemonError::Log)?;
    let mut daemon = Daemon {
        global: Arc::new(Semaphore::new(rules.max_jobs)),
        rules: rules.clone(),
        running: HashMap::new(),
        retiring: Vec::new(),
        abort: Arc::new(AtomicBool::new(false)),
        logs,
        shared: Arc::new(RwLock::new(Arc::new(rules.clone()))),
    };
    for rule in &rules.rules {
        daemon.start_rule(rule)?;
    }
    let ready = Arc::new(AtomicBool::new(false));
    let api = match &rules.api {
        Some(config) => {
            Some(crate::api::start(config, daemon.shared.clone(), ready.clone()).await?)
        }
        None => None,
    };
    let (file_tx, mut file_changed) = tokio::sync::mpsc::unbounded_channel();
    let _rules_watch = reload::watch_rules_file(&rules.path, file_tx)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the rules file: reload with SIGHUP"))
        .ok();
    // Every rule's folder is watched: tell systemd (a no-op outside systemd) and `/healthz`.
    ready.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    tracing::info!(
        rules = rules.rules.len(),
        max_jobs = rules.max_jobs,
        "ready"
    );
    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => break,
            Some(why) = control.reload.recv() => reload::reload(&mut daemon, why),
            Some(()) = file_changed.recv() => {
                // Editors write in steps: let the file settle, then read it once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while file_changed.try_recv().is_ok() {}
                reload::reload(&mut daemon, "the rules file changed");
            }
        }
    }
    tracing::info!("shutting down: no new manifests are taken");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // The API first: its waiting calls answer at once, so no client holds the stop.
    if let Some(api) = api {
        api.stop().await;
    }
    daemon.shutdown().await;
    Ok(())
}
