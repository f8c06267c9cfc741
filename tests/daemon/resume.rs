//! A large job interrupted by a crash continues where it stopped: the pieces journal.
#![cfg(feature = "crash-points")]

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::support::*;

const PART: usize = 8 << 20;
const PARTS: usize = 8;

/// Deterministic bytes, different per seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// 64 MiB of eight sources, in pwrite mode with fsync on: the parts, the manifest, and what the
/// output must be.
fn setup(env: &Env) -> Vec<u8> {
    let mut want = Vec::with_capacity(PART * PARTS);
    let mut names = Vec::new();
    for i in 0..PARTS {
        let b = bytes(i as u64 + 1, PART);
        env.data(&format!("p{i}"), &b);
        want.extend_from_slice(&b);
        names.push(format!("p{i}"));
    }
    let m = serde_json::json!({"output": "big.bin", "sources": names});
    env.drop_renamed("in", "big.json", &m.to_string());
    want
}

/// A daemon that aborts at 70 % of the copy (as `kill -9` would: no destructor runs).
fn crash_at_70(env: &Env) {
    let stderr = env.path("crashed.stderr");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(env.rules())
        .env("RUST_LOG", "info")
        .env("CONCATD_CRASH_AT", "mid-copy@70%")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let log = fs::read_to_string(&stderr).unwrap();
    assert!(!status.success(), "the daemon aborted: {log}");
    assert!(log.contains("crash point mid-copy"), "{log}");
    assert_eq!(count_results(&env.path("in")), 0);
    assert_eq!(
        temps_in(&env.path("out")).len(),
        1,
        "the temporary output is left"
    );
}

/// `rchar` of `/proc/<pid>/io`: every byte the process read with read/pread (in pwrite mode the
/// copy reads each source byte it copies exactly once).
fn rchar(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

fn wait_for_result(env: &Env) -> serde_json::Value {
    wait_until(Duration::from_secs(60), || {
        count_results(&env.path("in")) == 1
    });
    results(&env.path("in")).pop().unwrap()
}

#[test]
fn a_crashed_job_resumes_from_its_pieces_journal() {
    let env = Env::new("    write_mode: pwrite\n    fsync: true\n");
    let want = setup(&env);
    crash_at_70(&env);
    let d = env.start_named("restarted");
    let r = wait_for_result(&env);
    let read = rchar(d.child.id());
    let log = d.log();
    assert_eq!(d.stop(), 0);
    assert_eq!(r["status"], "succeeded", "{r}");
    let out = fs::read(env.path("out/big.bin")).unwrap();
    assert!(out == want, "the resumed output differs from its sources");
    assert_eq!(r["blake3"], blake3::hash(&want).to_hex().as_str());
    assert_eq!(
        fs::read_to_string(env.path("out/big.bin.b3")).unwrap(),
        format!("{}  big.bin\n", blake3::hash(&want).to_hex())
    );
    assert!(
        log.contains("resuming: the pieces journal matches"),
        "{log}"
    );
    let total = want.len() as u64;
    let percent = read as f64 * 100.0 / total as f64;
    eprintln!("restarted daemon read {read} bytes: {percent:.1} % of the {total}-byte output");
    assert!(
        percent <= 40.0,
        "re-copied {percent:.1} % (rchar {read}): {log}"
    );
    assert!(temps_in(&env.path("out")).is_empty());
}

/// A source rewritten (same size) between the crash and the restart: the journal's pieces no
/// longer describe the sources, so the rerun copies everything again and publishes the new bytes.
#[test]
fn a_source_changed_before_the_rerun_means_copying_from_scratch() {
    let env = Env::new("    write_mode: pwrite\n    fsync: false\n");
    let mut want = setup(&env);
    crash_at_70(&env);
    let new = bytes(99, PART);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(env.path("data/p0"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &new, 0).unwrap();
    drop(f);
    want[..PART].copy_from_slice(&new);
    let d = env.start_named("restarted");
    let r = wait_for_result(&env);
    let read = rchar(d.child.id());
    let log = d.log();
    assert_eq!(d.stop(), 0);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(fs::read(env.path("out/big.bin")).unwrap() == want);
    assert_eq!(r["blake3"], blake3::hash(&want).to_hex().as_str());
    assert!(log.contains("copying from scratch"), "{log}");
    assert!(
        read >= want.len() as u64,
        "everything was read again ({read})"
    );
}

/// A shutdown whose grace runs out aborts the job mid-copy; the next start continues from the
/// pieces it journaled instead of copying again.
#[test]
fn a_job_aborted_by_shutdown_resumes_at_the_next_start() {
    let env = Env::new("    write_mode: pwrite\n    fsync: true\n");
    env.write_rules(
        &fs::read_to_string(env.rules())
            .unwrap()
            .replace("shutdown_grace: 10s", "shutdown_grace: 1ms"),
    );
    let d = env.start();
    let want = setup(&env);
    let work = env.path("in/.work");
    // Once some piece is journaled (a header and a record), stop the daemon.
    wait_until(Duration::from_secs(30), || {
        walk(&work)
            .iter()
            .any(|p| p.ends_with(".pieces") && fs::metadata(p).is_ok_and(|m| m.len() > 64))
    });
    let log = d.log();
    assert_eq!(d.stop(), 0, "{log}");
    assert_eq!(
        count_results(&env.path("in")),
        0,
        "the job was aborted, not finished"
    );
    assert_eq!(
        temps_in(&env.path("out")).len(),
        1,
        "its temporary output is kept"
    );
    let d = env.start_named("restarted");
    let r = wait_for_result(&env);
    let read = rchar(d.child.id());
    let log = d.log();
    assert_eq!(d.stop(), 0);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(fs::read(env.path("out/big.bin")).unwrap() == want);
    assert_eq!(r["blake3"], blake3::hash(&want).to_hex().as_str());
    assert!(
        log.contains("resuming: the pieces journal matches"),
        "{log}"
    );
    let total = want.len() as u64;
    eprintln!("after the shutdown, the restarted daemon read {read} of {total} bytes");
    assert!(read < total, "nothing was reused (rchar {read})");
}
