//! Extent sharing on reflink filesystems (XFS with `reflink=1`, Btrfs), on loop images made by
//! the test and mounted under a temporary folder (needs root; under `CI` a missing tool or a
//! refused mount fails the test instead of skipping it).
//!
//! Every job is checked as everywhere else (bytes, `b3sum`, sidecar, nothing left behind) and, on
//! top, by what the filesystem says: how much free space the job took (after `sync -f`), and
//! whether `filefrag -v` marks the output's extents `shared`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json as j;

use super::{Env, bytes, json};

const MIB: usize = 1 << 20;

/// A filesystem on a loop image, mounted at `mnt` until dropped.
struct Image {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

fn unavailable(what: &str) -> Option<Image> {
    if std::env::var_os("CI").is_some() {
        panic!("reflink tests: {what} (CI is set: failing instead of skipping)");
    }
    eprintln!("SKIPPED: reflink tests need root, loop devices and mkfs: {what}");
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// A fresh `fs` ("xfs" or "btrfs") of `mib` MiB (a sparse image), mounted.
fn image(fs: &str, mib: u64) -> Option<Image> {
    if !rustix::process::geteuid().is_root() {
        return unavailable("not root");
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("{fs}.img"));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let mkfs = match fs {
        "xfs" => run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img)),
        _ => run(Command::new("mkfs.btrfs").arg("-q").arg(&img)),
    };
    if let Err(e) = mkfs {
        return unavailable(&e);
    }
    if let Err(e) = run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt))
    {
        return unavailable(&e);
    }
    Some(Image { mnt, _dir: dir })
}

impl Drop for Image {
    fn drop(&mut self) {
        // Busy for a moment after a process on it exits, now and then: retry, then detach.
        for _ in 0..50 {
            if run(Command::new("umount").arg(&self.mnt)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
    }
}

/// An [`Env`] whose folders all lie on `image`.
fn env_on(image: &Image, extra: &str) -> Env {
    let dir = tempfile::tempdir_in(&image.mnt).unwrap();
    for d in ["in", "out", "data", "outside"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let env = Env { dir };
    env.rules(extra);
    env
}

/// Free bytes of the filesystem holding `path`, once everything written is on disk.
fn free(path: &Path) -> u64 {
    run(Command::new("sync").arg("-f").arg(path)).unwrap();
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bavail * st.f_frsize
}

/// Bytes of `file` that `filefrag -v` reports in extents flagged `shared`.
fn shared_bytes(file: &Path) -> u64 {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "filefrag (e2fsprogs) is installed");
    let text = String::from_utf8(out.stdout).unwrap();
    let block: u64 = text
        .split("blocks of ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    text.lines()
        .filter(|l| l.contains("shared"))
        .filter_map(|l| l.split(':').nth(3)?.trim().parse::<u64>().ok())
        .map(|blocks| blocks * block)
        .sum()
}

/// Aligned sources (whole MiBs, and a last one with a sub-block tail) are shared: the output
/// takes (almost) no new space, its extents are shared, and its bytes and hash are right — in
/// `auto` (which reports `copy_file_range`) and in `copy_file_range`, with and without fsync.
fn shares_aligned_sources(fs: &str) {
    let Some(img) = image(fs, 400) else { return };
    for (mode, fsync) in [("auto", true), ("copy_file_range", false)] {
        let env = env_on(
            &img,
            &format!("    write_mode: {mode}\n    fsync: {fsync}\n"),
        );
        let parts: Vec<Vec<u8>> = (0..4)
            .map(|i| bytes(i + 1, 3 * MIB))
            .chain([bytes(9, 2 * MIB + 4096 * 3 + 100)])
            .collect();
        let mut names = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            env.data(&format!("p{i}"), p);
            names.push(format!("p{i}"));
        }
        let want = parts.concat();
        let before = free(&img.mnt);
        let r = env.succeeds(
            &json(j!({"output": "shared.bin", "sources": names})),
            "shared.bin",
            &want,
        );
        let taken = before.saturating_sub(free(&img.mnt));
        assert_eq!(r["write_mode"], "copy_file_range", "{r:#}");
        let out = env.path("out/shared.bin");
        let shared = shared_bytes(&out);
        eprintln!(
            "{fs} {mode}: {} bytes output, {taken} bytes of new space, {shared} bytes shared",
            want.len()
        );
        assert!(
            taken * 20 <= want.len() as u64,
            "{fs} {mode}: the output took {taken} bytes of new space for {} bytes",
            want.len()
        );
        assert!(
            shared >= (want.len() - 4096) as u64,
            "{fs} {mode}: only {shared} of {} bytes in shared extents",
            want.len()
        );
    }
}

#[test]
fn xfs_shares_aligned_sources() {
    shares_aligned_sources("xfs");
}

#[test]
fn btrfs_shares_aligned_sources() {
    shares_aligned_sources("btrfs");
}

/// A source of an odd size shifts every byte after it off the block grid: what comes before it
/// is shared, what follows is copied (and so takes space), and the bytes are right either way;
/// ranges of sources (`offset`) that are not block-aligned are copied too. `pwrite` shares
/// nothing.
fn falls_back_where_unaligned(fs: &str) {
    let Some(img) = image(fs, 400) else { return };
    let env = env_on(&img, "    fsync: false\n");
    let a = bytes(21, 4 * MIB);
    let odd = bytes(22, 1000);
    let b = bytes(23, 4 * MIB);
    env.data("a", &a);
    env.data("odd", &odd);
    env.data("b", &b);
    let want = [&a[..], &odd, &b, &a[4096..], &b[100..MIB]].concat();
    let before = free(&img.mnt);
    let r = env.succeeds(
        &json(j!({"output": "mixed.bin", "sources": [
            "a", "odd", "b",
            {"path": "a", "offset": 4096},
            {"path": "b", "offset": 100, "length": MIB - 100}
        ]})),
        "mixed.bin",
        &want,
    );
    assert_eq!(r["write_mode"], "copy_file_range");
    let taken = before.saturating_sub(free(&img.mnt));
    let shared = shared_bytes(&env.path("out/mixed.bin"));
    eprintln!("{fs} mixed: {taken} bytes of new space, {shared} shared");
    assert!(shared >= a.len() as u64, "{fs}: a is shared ({shared})");
    // Everything after `odd` is unaligned: at least that much was really written.
    let copied = (want.len() - a.len()) as u64;
    assert!(
        taken + 64 * 1024 >= copied,
        "{fs}: {taken} bytes of new space, {copied} copied"
    );

    // pwrite never shares.
    env.rules("    write_mode: pwrite\n    fsync: false\n");
    let r = env.succeeds(
        &json(j!({"output": "p.bin", "sources": ["a", "b"]})),
        "p.bin",
        &[&a[..], &b].concat(),
    );
    assert_eq!(r["write_mode"], "pwrite");
    assert_eq!(shared_bytes(&env.path("out/p.bin")), 0);
}

#[test]
fn xfs_falls_back_where_unaligned() {
    falls_back_where_unaligned("xfs");
}

#[test]
fn btrfs_falls_back_where_unaligned() {
    falls_back_where_unaligned("btrfs");
}

/// On a nearly full filesystem an output of shared extents still succeeds (as `cat` would: it
/// needs no new blocks; before sharing, `copy_file_range` allocated the whole output first and
/// failed `no_space`), while an output that needs more new blocks than are free is `no_space`
/// with nothing left behind — and the space it took is given back.
fn full_filesystem(fs: &str) {
    let Some(img) = image(fs, 400) else { return };
    for mode in ["auto", "copy_file_range"] {
        let env = env_on(&img, &format!("    write_mode: {mode}\n    fsync: false\n"));
        let big = bytes(31, 32 * MIB);
        let odd = bytes(32, 777);
        env.data("big", &big);
        env.data("odd", &odd);
        // Leave about 8 MiB free: far less than the 64 MiB the shared output is long.
        let filler = env.path("filler");
        let room = free(&img.mnt).saturating_sub(8 << 20);
        let f = std::fs::File::create(&filler).unwrap();
        let _ = rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, room);
        drop(f);
        let left = free(&img.mnt);
        assert!(left < 24 << 20, "{fs}: {left} bytes still free");
        env.succeeds(
            &json(j!({"output": "twice.bin", "sources": ["big", "big"]})),
            "twice.bin",
            &[&big[..], &big].concat(),
        );
        // Unaligned after the first byte: 32 MiB to write into about 8 MiB.
        let r = env.fails(
            "m2.json",
            &json(j!({"output": "odd.bin", "sources": ["odd", "big"]})),
            "no_space",
            "odd.bin",
        );
        // A failed job, and `plan`, say what the mode runs here.
        assert_eq!(r["write_mode"], "copy_file_range", "{fs} {mode}: {r:#}");
        let (code, p) = env.plan_json("p.json", &json(j!({"output": "p.bin", "sources": ["big"]})));
        assert_eq!(code, 0, "{p:#}");
        assert_eq!(p["write_mode"], "copy_file_range", "{fs} {mode}: {p:#}");
        let after = free(&img.mnt);
        assert!(
            after + (1 << 20) >= left,
            "{fs} {mode}: the failed job's space was given back ({left} → {after})"
        );
        std::fs::remove_file(&filler).unwrap();
    }
}

#[test]
fn xfs_full_filesystem_shares_or_is_no_space() {
    full_filesystem("xfs");
}

#[test]
fn btrfs_full_filesystem_shares_or_is_no_space() {
    full_filesystem("btrfs");
}

/// A daemon job in sharing mode, killed at 60 % of its copy, resumes from its pieces journal:
/// the rerun shares or copies only what is left, and the output is right and still shared.
#[cfg(feature = "crash-points")]
mod resume {
    use std::process::Stdio;
    use std::time::Duration;

    use super::*;

    use crate::support;

    fn crash_then_resume(fs: &str) {
        let Some(img) = image(fs, 400) else { return };
        let env = support::Env {
            dir: tempfile::tempdir_in(&img.mnt).unwrap(),
        };
        for d in ["in", "out", "data", "logs", "in2"] {
            std::fs::create_dir(env.path(d)).unwrap();
        }
        env.write_rules(&format!(
            "log_dir: logs\nshutdown_grace: 10s\nrules:\n{}",
            support::rule("r1", "in", "    fsync: true\n")
        ));
        let mut want = Vec::new();
        let mut names = Vec::new();
        for i in 0..8 {
            let b = bytes(40 + i, 4 * MIB);
            env.data(&format!("p{i}"), &b);
            want.extend_from_slice(&b);
            names.push(format!("p{i}"));
        }
        let m = j!({"output": "big.bin", "sources": names});
        env.drop_renamed("in", "big.json", &m.to_string());
        let stderr = env.path("crashed.stderr");
        let mut child = Command::new(support::bin())
            .args(["run", "-c"])
            .arg(env.rules())
            .env("RUST_LOG", "info")
            .env("CONCATD_CRASH_AT", "mid-copy@60%")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        // A daemon that finishes the job instead (a binary built without crash points) would
        // run on forever: bound the wait.
        let mut status = None;
        let clock = std::time::Instant::now();
        while status.is_none() && clock.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
            status = child.try_wait().unwrap();
        }
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&stderr).unwrap();
        let crashed = status.is_some_and(|s| !s.success());
        assert!(crashed && log.contains("crash point mid-copy"), "{log}");
        assert_eq!(support::temps_in(&env.path("out")).len(), 1, "{log}");
        let d = env.start_named("restarted");
        support::wait_until(Duration::from_secs(60), || {
            support::count_results(&env.path("in")) == 1
        });
        let r = support::results(&env.path("in")).pop().unwrap();
        let log = d.log();
        assert_eq!(d.stop(), 0);
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(r["write_mode"], "copy_file_range", "{r}");
        let out = env.path("out/big.bin");
        assert!(
            std::fs::read(&out).unwrap() == want,
            "resumed output differs"
        );
        assert_eq!(r["blake3"], blake3::hash(&want).to_hex().as_str());
        assert!(
            log.contains("resuming: the pieces journal matches"),
            "{log}"
        );
        assert!(
            shared_bytes(&out) >= want.len() as u64,
            "{fs}: the resumed output is shared"
        );
        assert!(support::temps_in(&env.path("out")).is_empty());
    }

    #[test]
    fn xfs_sharing_job_resumes_after_a_crash() {
        crash_then_resume("xfs");
    }

    #[test]
    fn btrfs_sharing_job_resumes_after_a_crash() {
        crash_then_resume("btrfs");
    }
}
