//! A crash at every named step of a job (`CONCATD_CRASH_AT`), then a restart: exactly one result,
//! the output absent or byte-correct with its own sidecar (with `overwrite`: the old bytes with the
//! old `.b3`, or the new with the new), no temporary file left, no spurious `output_exists`.
#![cfg(feature = "crash-points")]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::publish::{our_temps, sidecar_of};
use crate::support::*;

/// Start the daemon with `CONCATD_CRASH_AT=point`, drop `manifest` as `name`, wait for the abort.
fn run_until_crash(env: &Env, point: &str, name: &str, manifest: &str) {
    let stderr = env.path("crashing.stderr");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(env.rules())
        .env("RUST_LOG", "info")
        .env("CONCATD_CRASH_AT", point)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let log = || fs::read_to_string(&stderr).unwrap_or_default();
    wait_until(Duration::from_secs(10), || log().contains(" ready"));
    env.drop_renamed("in", name, manifest);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{point}: the daemon did not crash: {}", log());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "{point}: {status:?}");
    assert!(
        log().contains(&format!(
            "crash point {}:",
            point.split('@').next().unwrap()
        )),
        "{point}: {}",
        log()
    );
}

/// Sources of the new output: 8 files of 512 KiB (mid-copy has progress to cross).
fn sources(env: &Env) -> Vec<u8> {
    let mut all = Vec::new();
    let mut list = Vec::new();
    for i in 0..8u32 {
        let chunk: Vec<u8> = (0..512 * 1024u32)
            .map(|j| (j.wrapping_mul(7) ^ i) as u8)
            .collect();
        env.data(&format!("p{i}"), &chunk);
        all.extend_from_slice(&chunk);
        list.push(format!("p{i}"));
    }
    all
}

/// Crash at `point` with output `output` (relative), with and without an earlier output there.
fn crash_and_recover(point: &str, output: &str, overwrite: bool) {
    let env = Env::new(if overwrite {
        "    overwrite: true\n"
    } else {
        ""
    });
    let new = sources(&env);
    let out = env.path("out").join(output);
    let old = b"the earlier output\n";
    if overwrite {
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        fs::write(&out, old).unwrap();
        fs::write(b3_of(&out), sidecar_of(&out)).unwrap();
    }
    let list: Vec<String> = (0..8).map(|i| format!("\"p{i}\"")).collect();
    let manifest = format!(r#"{{"output":"{output}","sources":[{}]}}"#, list.join(","));
    run_until_crash(&env, point, "m.json", &manifest);
    let d = env.start();
    wait_until(Duration::from_secs(20), || {
        count_results(&env.path("in")) == 1 && job_dirs(&env.path("in")).is_empty()
    });
    let all = results(&env.path("in"));
    assert_eq!(all.len(), 1, "{point}: {all:?}");
    let r = &all[0];
    assert_eq!(
        r["status"], "succeeded",
        "{point} (overwrite {overwrite}): {r}"
    );
    let bytes = fs::read(&out).unwrap();
    assert!(
        bytes == new || (overwrite && bytes == old),
        "{point}: the output holds neither the old nor the new bytes"
    );
    assert_eq!(bytes, new, "{point}: a succeeded job published its bytes");
    assert_eq!(
        fs::read_to_string(b3_of(&out)).unwrap(),
        sidecar_of(&out),
        "{point} (overwrite {overwrite}): the .b3 is not the output's"
    );
    assert_eq!(r["blake3"], blake3::hash(&new).to_hex().as_str());
    assert_eq!(our_temps(&env.path("out")), Vec::<String>::new(), "{point}");
    let left: Vec<_> = walk(&env.path("in"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{point}: {left:?}");
    assert_eq!(d.stop(), 0);
}

fn b3_of(out: &Path) -> std::path::PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".b3");
    p.into()
}

macro_rules! crash_tests {
    ($($test:ident: $point:expr,)*) => {$(
        #[test]
        fn $test() {
            crash_and_recover($point, "c/out.bin", false);
            crash_and_recover($point, "c/out.bin", true);
        }
    )*};
}

crash_tests! {
    crash_after_claim: "after-claim",
    crash_mid_copy: "mid-copy@50%",
    crash_after_fsync: "after-fsync",
    crash_after_sidecar_temp: "after-sidecar-temp",
    crash_after_output_rename: "after-output-rename",
    crash_after_sidecar_rename: "after-sidecar-rename",
    crash_after_dir_fsync: "after-dir-fsync",
    crash_after_result: "after-result",
    crash_mid_filing: "mid-filing",
    crash_after_filing: "after-filing",
}

/// An output path over PATH_MAX is refused up front, even with a crash where the rename was.
#[test]
fn an_output_over_path_max_is_refused_and_a_crash_leaves_nothing() {
    let env = Env::new("");
    env.data("a", b"x");
    let deep = std::iter::repeat_n("d".repeat(200), 4096 / 201 + 1)
        .collect::<Vec<_>>()
        .join("/");
    let manifest = format!(r#"{{"output":"{deep}/x.bin","sources":["a"]}}"#);
    let stderr = env.path("crashing.stderr");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(env.rules())
        .env("RUST_LOG", "info")
        .env("CONCATD_CRASH_AT", "after-output-rename")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let log = || fs::read_to_string(&stderr).unwrap_or_default();
    wait_until(Duration::from_secs(10), || log().contains(" ready"));
    env.drop_renamed("in", "deep.json", &manifest);
    // Either the crash (today's code published it) or the refusal.
    wait_until(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some() || count_results(&env.path("in")) == 1
    });
    let _ = child.kill();
    let _ = child.wait();
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let r = &results(&env.path("in"))[0];
    assert_eq!(r["error"]["kind"], "output_not_allowed", "{r}");
    assert_eq!(our_temps(&env.path("out")), Vec::<String>::new());
    assert_eq!(d.stop(), 0);
}
