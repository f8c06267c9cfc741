//! Crash points: named steps of a job where a test build can kill the process on purpose.
//!
//! Recovery is only as good as the crashes it was tried against. With the `crash-points` cargo
//! feature (off in release builds and by default), `CONCATD_CRASH_AT=NAME` makes the process
//! abort — no destructors, no flushing, as close to `kill -9` as a process can do to itself — the
//! first time it reaches the step `NAME`; `NAME@K` aborts at its `K`th arrival, and for
//! [`fraction`] points `NAME@P%` aborts once `P` percent of the work is done. Without the feature
//! every function here is an empty inline that the compiler removes.

#[cfg(feature = "crash-points")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Arrivals at the configured point so far.
    static HITS: AtomicU64 = AtomicU64::new(0);

    /// `(name, count or percent, is_percent)` from `CONCATD_CRASH_AT`.
    fn wanted() -> Option<(String, u64, bool)> {
        let spec = std::env::var("CONCATD_CRASH_AT").ok()?;
        let (name, at) = match spec.split_once('@') {
            Some((n, a)) => (n.to_owned(), a.to_owned()),
            None => (spec, "1".to_owned()),
        };
        match at.strip_suffix('%') {
            Some(p) => Some((name, p.parse().ok()?, true)),
            None => Some((name, at.parse().ok()?, false)),
        }
    }

    fn die(name: &str) -> ! {
        eprintln!("concatd: crash point {name}: aborting (CONCATD_CRASH_AT)");
        std::process::abort()
    }

    pub fn point(name: &str) {
        if let Some((want, k, false)) = wanted()
            && want == name
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == k
        {
            die(name);
        }
    }

    pub fn fraction(name: &str, done: u64, total: u64) {
        if let Some((want, p, true)) = wanted()
            && want == name
            && total > 0
            && (done as u128) * 100 >= (p as u128) * (total as u128)
        {
            die(name);
        }
    }
}

/// Abort here when `CONCATD_CRASH_AT` names this step (test builds only).
#[inline(always)]
pub fn point(_name: &str) {
    #[cfg(feature = "crash-points")]
    imp::point(_name);
}

/// Abort here once `done` of `total` reaches the percentage `CONCATD_CRASH_AT=NAME@P%` names
/// (test builds only).
#[allow(dead_code)] // armed by the copy pass
#[inline(always)]
pub fn fraction(_name: &str, _done: u64, _total: u64) {
    #[cfg(feature = "crash-points")]
    imp::fraction(_name, _done, _total);
}
