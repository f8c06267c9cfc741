//! Sources that change while a job reads them.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

use super::{Env, bytes, json};

const SIZE: usize = 4 << 20;
const RUNS: usize = 30;

/// A writer rewrites a same-size source in place, alternating two versions (64 KiB writes back
/// to back, then a short pause with the file whole), while jobs copy it in every write mode.
/// A job may fail `source_changed`; one that succeeds must hold exactly one version. Before the
/// copy pass re-checked each source after reading it, pwrite and mmap runs published outputs
/// that matched neither version.
#[test]
fn a_source_rewritten_in_place_is_never_published_spliced() {
    let versions = Arc::new([bytes(101, SIZE), bytes(202, SIZE)]);
    let mut report = Vec::new();
    let mut spliced_total = 0;
    for mode in ["pwrite", "mmap", "copy_file_range"] {
        let env = Env::new(&format!("    write_mode: {mode}\n    fsync: false\n"));
        let src = env.data("src", &versions[0]);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, versions) = (stop.clone(), versions.clone());
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
                let mut which = 1;
                while !stop.load(Ordering::Relaxed) {
                    for (i, chunk) in versions[which].chunks(64 << 10).enumerate() {
                        f.write_all_at(chunk, (i * (64 << 10)) as u64).unwrap();
                    }
                    which ^= 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        let (mut ok, mut changed, mut spliced) = (0, 0, 0);
        for run in 0..RUNS {
            let m = env.path(&format!("m{run}.json"));
            let out = format!("o{run}");
            std::fs::write(
                &m,
                json(serde_json::json!({"output": out, "sources": ["src"]})),
            )
            .unwrap();
            let done = Command::cargo_bin("concatd")
                .unwrap()
                .args(["once", "-c"])
                .arg(env.path("rules.yaml"))
                .args(["--rule", "t"])
                .arg(&m)
                .output()
                .unwrap();
            let r: Value = serde_json::from_slice(&done.stdout).unwrap();
            match r["status"].as_str().unwrap() {
                "succeeded" => {
                    let got = std::fs::read(env.path("out").join(&out)).unwrap();
                    if got == versions[0] || got == versions[1] {
                        ok += 1;
                    } else {
                        spliced += 1;
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
            "{mode}: {ok} whole, {spliced} spliced, {changed} source_changed"
        ));
        spliced_total += spliced;
    }
    eprintln!("{}", report.join("; "));
    assert_eq!(spliced_total, 0, "spliced outputs published: {report:?}");
}
