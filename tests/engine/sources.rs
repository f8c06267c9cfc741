//! Sources that change while a job reads them.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

use super::{Env, bytes, json};

const SIZE: usize = 4 << 20;
const RUNS: usize = 30;
/// A pause of the writer inside a version long enough for a whole 4 MiB job to read the file
/// meanwhile (a 64 KiB write takes some 20 µs; a job's read of 4 MiB, over 1 ms).
const STALL: Duration = Duration::from_micros(500);

/// A writer rewrites a same-size source in place, alternating two versions (64 KiB writes back
/// to back, then a pause of 3 or 30 ms with the file whole), while jobs copy it in every write mode.
/// A job may fail `source_changed`; one that succeeds must hold exactly one version. Before the
/// copy pass re-checked each source after reading it, pwrite and mmap runs published outputs
/// that matched neither version.
///
/// One thing no check can see: a writer stalled halfway through a version (preempted on this
/// busy machine) while a whole job plans, copies and re-checks — the file then *holds* a mix, and
/// it is copied faithfully. The writer measures its longest pause between two writes of a
/// version during each job; a mixed output of a job during which the writer stalled for longer
/// than [`STALL`] is reported as such, not counted as spliced.
#[test]
fn a_source_rewritten_in_place_is_never_published_spliced() {
    let versions = Arc::new([bytes(101, SIZE), bytes(202, SIZE)]);
    let mut report = Vec::new();
    let mut spliced_total = 0;
    for mode in ["pwrite", "mmap", "copy_file_range"] {
        let env = Env::new(&format!("    write_mode: {mode}\n    fsync: false\n"));
        let src = env.data("src", &versions[0]);
        let stop = Arc::new(AtomicBool::new(false));
        // Longest gap (ns) between the starts of two writes of one version, since last reset.
        let max_gap = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, versions, max_gap) = (stop.clone(), versions.clone(), max_gap.clone());
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
                let mut which = 1;
                while !stop.load(Ordering::Relaxed) {
                    let mut last: Option<Instant> = None;
                    for (i, chunk) in versions[which].chunks(64 << 10).enumerate() {
                        let now = Instant::now();
                        if let Some(last) = last {
                            let gap = (now - last).as_nanos() as u64;
                            max_gap.fetch_max(gap, Ordering::Relaxed);
                        }
                        f.write_all_at(chunk, (i * (64 << 10)) as u64).unwrap();
                        let took = now.elapsed().as_nanos() as u64;
                        max_gap.fetch_max(took, Ordering::Relaxed);
                        last = Some(now);
                    }
                    which ^= 1;
                    // Every other pause is longer than the settle window (20 ms,
                    // src/source/local.rs), so jobs can pin a settled version; were all pauses
                    // short, every job would be refused "still being written" at planning and
                    // the reads and rechecks would go untested. The short ones keep jobs
                    // starting while the last writes of a version are in flight.
                    let pause = if which == 0 { 3 } else { 30 };
                    std::thread::sleep(Duration::from_millis(pause));
                }
            })
        };
        let (mut ok, mut changed, mut spliced, mut stalled) = (0, 0, 0, 0);
        for run in 0..RUNS {
            let m = env.path(&format!("m{run}.json"));
            let out = format!("o{run}");
            std::fs::write(
                &m,
                json(serde_json::json!({"output": out, "sources": ["src"]})),
            )
            .unwrap();
            max_gap.store(0, Ordering::Relaxed);
            let done = Command::cargo_bin("concatd")
                .unwrap()
                .args(["once", "-c"])
                .arg(env.path("rules.yaml"))
                .args(["--rule", "t"])
                .arg(&m)
                .output()
                .unwrap();
            let gap = Duration::from_nanos(max_gap.load(Ordering::Relaxed));
            let r: Value = serde_json::from_slice(&done.stdout).unwrap();
            match r["status"].as_str().unwrap() {
                "succeeded" => {
                    let got = std::fs::read(env.path("out").join(&out)).unwrap();
                    if got == versions[0] || got == versions[1] {
                        ok += 1;
                    } else if gap > STALL {
                        stalled += 1;
                        eprintln!(
                            "{mode} run {run}: mixed, the writer stalled {gap:?}: {}",
                            layout(&got, &versions)
                        );
                    } else {
                        spliced += 1;
                        eprintln!("{mode} run {run}: spliced: {}", layout(&got, &versions));
                    }
                }
                _ => {
                    assert_eq!(r["error"]["kind"], "source_changed", "{r:#}");
                    assert!(!env.path("out").join(&out).exists());
                    changed += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        report.push(format!(
            "{mode}: {ok} whole, {spliced} spliced, {stalled} mixed while the writer stalled, {changed} source_changed"
        ));
        spliced_total += spliced;
    }
    eprintln!("{}", report.join("; "));
    assert_eq!(spliced_total, 0, "spliced outputs published: {report:?}");
}

/// Which version each 64 KiB chunk of `got` holds: `0`, `1`, or `x` (neither, or a mix).
fn layout(got: &[u8], versions: &[Vec<u8>; 2]) -> String {
    got.chunks(64 << 10)
        .zip(
            versions[0]
                .chunks(64 << 10)
                .zip(versions[1].chunks(64 << 10)),
        )
        .map(|(g, (a, b))| match (g == a, g == b) {
            (true, _) => '0',
            (_, true) => '1',
            _ => 'x',
        })
        .collect()
}
