//! A rule's queue and the task that feeds its jobs.
//!
//! Items are started in arrival order (resumed jobs first), at most `concurrency` of one rule at
//! once, and each only with a permit of the daemon-wide semaphore of `max_jobs`: 1,000 manifests
//! dropped at once wait in the queue (as names, claimed one by one as they start, so a second
//! daemon on the same folder can take its share). Jobs run on blocking threads.
//!
//! Job folders in `.work/` are queued for recovery at start, on every rescan and every
//! [`SWEEP_EVERY`]: those a live daemon holds locked are skipped, so jobs abandoned by a second
//! daemon that died are picked up without a restart of this one.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::recover;
use super::runner::{self, Item};
use super::watch::{self, Notice};
use crate::config::Rule;

/// How often `.work/` is swept for jobs abandoned by a dead daemon.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A FIFO of distinct items.
#[derive(Debug, Default)]
pub struct Queue {
    order: VecDeque<Item>,
    queued: HashSet<Item>,
}

impl Queue {
    /// Append `item` unless it is already waiting. True if it was added.
    pub fn push(&mut self, item: Item) -> bool {
        if self.queued.contains(&item) {
            return false;
        }
        self.queued.insert(item.clone());
        self.order.push_back(item);
        true
    }

    /// The oldest item.
    pub fn pop(&mut self) -> Option<Item> {
        let item = self.order.pop_front()?;
        self.queued.remove(&item);
        Some(item)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The current settings of a rule, swapped on reload; a job reads them once, when it starts.
pub type SharedRule = Arc<RwLock<Arc<Rule>>>;

/// Everything a rule's task needs.
pub struct RuleTask {
    pub rule: SharedRule,
    pub notices: UnboundedReceiver<Notice>,
    pub global: Arc<Semaphore>,
    /// Set at the end of the shutdown grace period: running jobs abort.
    pub abort: Arc<AtomicBool>,
    /// Cancelled when the rule must stop taking manifests (removed, or shutdown).
    pub stop: CancellationToken,
}

impl RuleTask {
    /// Feed jobs until stopped, then wait for the running ones.
    pub async fn run(mut self) {
        let watch_dir = self.current().watch.clone();
        let name = self.current().name.clone();
        crate::metrics::rule_started(&name);
        // This task's share of the rule's queue depth, taken back out when the task ends.
        let mut depth = crate::metrics::queue_depth(&name);
        let mut queue = Queue::default();
        sweep(&watch_dir, &mut queue).await;
        let mut sweep_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
        let mut running = JoinSet::new();
        // When files too fresh to take were seen by a scan: look again then.
        let mut rescan_at: Option<tokio::time::Instant> = None;
        loop {
            depth.set(queue.len());
            let rule = self.current();
            let can_start = !queue.is_empty() && running.len() < rule.concurrency;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                notice = self.notices.recv() => match notice {
                    Some(Notice::Ready(name)) => {
                        queue.push(Item::New(name));
                    }
                    Some(Notice::Rescan) => {
                        crate::metrics::watch_rescan(&name);
                        sweep(&watch_dir, &mut queue).await;
                        rescan_at = rescan(&watch_dir, &mut queue).await;
                    }
                    None => break,
                },
                _ = sleep_until(rescan_at), if rescan_at.is_some() => {
                    rescan_at = rescan(&watch_dir, &mut queue).await;
                }
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    // `run_item` turns a job's panic into a failed result; anything else that
                    // unwinds leaves the item in `.work/` for the next sweep.
                    if let Err(e) = joined {
                        tracing::error!(rule = %rule.name, error = %e, "job task failed");
                    }
                }
                _ = sweep_tick.tick() => sweep(&watch_dir, &mut queue).await,
                permit = self.global.clone().acquire_owned(), if can_start => {
                    let Ok(permit) = permit else { break };
                    let item = queue.pop().expect("queue is not empty");
                    let abort = self.abort.clone();
                    running.spawn_blocking(move || {
                        runner::run_item(item, &rule, &abort);
                        drop(permit);
                    });
                }
            }
        }
        // Stopped: nothing it held waits here any more (a restart or another daemon takes it).
        depth.set(0);
        while running.join_next().await.is_some() {}
    }

    fn current(&self) -> Arc<Rule> {
        self.rule.read().expect("rule lock").clone()
    }
}

/// Queue the job folders of `.work/` for recovery (see `runner::run_item`).
async fn sweep(watch_dir: &std::path::Path, queue: &mut Queue) {
    let dir = watch_dir.to_owned();
    let listed = tokio::task::spawn_blocking(move || recover::list(&dir))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match listed {
        Ok(dirs) => dirs.into_iter().for_each(|d| {
            queue.push(Item::Resume(d));
        }),
        Err(e) => tracing::error!(folder = %watch_dir.display(), error = %e, "cannot list .work/"),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// List the folder and queue what is new; when to scan again (files still settling).
async fn rescan(dir: &std::path::Path, queue: &mut Queue) -> Option<tokio::time::Instant> {
    let d: PathBuf = dir.to_owned();
    match tokio::task::spawn_blocking(move || watch::scan(&d)).await {
        Ok(Ok(found)) => {
            let added = found
                .ready
                .into_iter()
                .filter(|n| queue.push(Item::New(n.clone())))
                .count();
            tracing::debug!(
                folder = %dir.display(), added, fresh = found.fresh, waiting = queue.len(),
                "scanned"
            );
            (found.fresh > 0).then(|| tokio::time::Instant::now() + watch::SCAN_SETTLE)
        }
        Ok(Err(e)) => {
            tracing::error!(folder = %dir.display(), error = %e, "cannot scan");
            None
        }
        Err(e) => {
            tracing::error!(folder = %dir.display(), error = %e, "scan task failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(n: &str) -> Item {
        Item::New(n.into())
    }

    #[test]
    fn fifo_without_duplicates() {
        let mut q = Queue::default();
        assert!(q.push(new("a")));
        assert!(q.push(new("b")));
        assert!(!q.push(new("a")), "a is already waiting");
        assert!(q.push(Item::Resume("/w/.work/1".into())));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(new("a")));
        // Once taken, the same name may arrive again (a new file of that name).
        assert!(q.push(new("a")));
        assert_eq!(q.pop(), Some(new("b")));
        assert_eq!(q.pop(), Some(Item::Resume("/w/.work/1".into())));
        assert_eq!(q.pop(), Some(new("a")));
        assert!(q.is_empty());
    }
}
