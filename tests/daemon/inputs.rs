//! Manifests the daemon must not read through: a symlink or a FIFO in place of a claimed
//! manifest (left in `.work/` for recovery, or raced in by a producer) is a failed result of kind
//! `invalid_manifest` that shows nothing of what the link points to, and never hangs the daemon.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

const SECRET: &str = "TOPSECRET-hunter2-first-line: root-password\nsecond_secret_line: x\n";

/// Every regular file (links not followed) under `dirs`, and the daemon's stderr.
fn nothing_shows(env: &Env, d: &Daemon) {
    let mut files: Vec<PathBuf> = vec![d.stderr.clone()];
    for dir in ["in/done", "in/failed", "logs"] {
        files.extend(regular_files(&env.path(dir)));
    }
    for f in files {
        let text = String::from_utf8_lossy(&fs::read(&f).unwrap()).into_owned();
        assert!(
            !text.contains("TOPSECRET") && !text.contains("hunter2"),
            "{} shows the secret:\n{text}",
            f.display()
        );
    }
}

fn regular_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.extend(regular_files(&p));
        } else if meta.is_file() {
            out.push(p);
        }
    }
    out
}

fn failed_result(env: &Env, name: &str) -> Value {
    let path = env.path("in/failed").join(format!("{name}.result.json"));
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_symlink_claimed_as_a_manifest_is_refused_at_recovery_and_shows_nothing() {
    let env = Env::new("    fsync: false\n");
    fs::write(env.path("secret.yaml"), SECRET).unwrap();
    let job = env.path("in/.work/01a2000000007000800000000000aaaa");
    fs::create_dir_all(&job).unwrap();
    symlink(env.path("secret.yaml"), job.join("m.yaml")).unwrap();
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let r = failed_result(&env, "m.yaml");
    assert_eq!(r["error"]["kind"], "invalid_manifest", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("not a regular file") && m.contains("symbolic link"),
        "{m}"
    );
    assert!(
        !m.contains(".work"),
        "the message names the manifest as dropped: {m}"
    );
    wait_until(Duration::from_secs(5), || {
        job_dirs(&env.path("in")).is_empty()
    });
    nothing_shows(&env, &d);
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_fifo_claimed_as_a_manifest_is_refused_and_sigterm_still_stops_the_daemon() {
    let env = Env::new("    fsync: false\n");
    let job = env.path("in/.work/01a2000000007000800000000000bbbb");
    fs::create_dir_all(&job).unwrap();
    let fifo = job.join("f.json");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let r = failed_result(&env, "f.json");
    assert_eq!(r["error"]["kind"], "invalid_manifest", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("not a regular file") && m.contains("FIFO"),
        "{m}"
    );
    assert!(!m.contains(".work"), "{m}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_manifest_error_names_the_manifest_as_dropped_not_its_job_folder() {
    let env = Env::new("    fsync: false\n");
    let d = env.start();
    env.drop_renamed(
        "in",
        "bad.json",
        r#"{"output":"o","sources":["a"],"colour":1}"#,
    );
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let r = failed_result(&env, "bad.json");
    assert_eq!(r["error"]["kind"], "invalid_manifest", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("colour") && m.contains("bad.json"), "{m}");
    assert!(!m.contains(".work"), "{m}");
    assert_eq!(d.stop(), 0);
}

/// A producer renames a valid manifest in, then a symlink to a secret over the same name, again
/// and again: whichever the daemon claims, no result and no log shows the secret.
#[test]
fn manifests_raced_with_symlinks_never_show_what_the_link_points_to() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"a");
    fs::write(env.path("secret.yaml"), SECRET).unwrap();
    let d = env.start();
    let inbox = env.path("in");
    let n = 300;
    for i in 0..n {
        let name = format!("m{i}.yaml");
        env.drop_renamed("in", &name, &format!("output: o{i}\nsources: [a]\n"));
        let link = inbox.join(format!(".l{i}.part"));
        symlink(env.path("secret.yaml"), &link).unwrap();
        fs::rename(&link, inbox.join(&name)).unwrap();
    }
    // Each name either was claimed (and has a result) or is still the symlink in the inbox.
    let settled = || {
        let filed = |i: usize| {
            ["done", "failed"].iter().any(|s| {
                inbox
                    .join(s)
                    .join(format!("m{i}.yaml.result.json"))
                    .exists()
            })
        };
        let left = |i: usize| fs::symlink_metadata(inbox.join(format!("m{i}.yaml"))).is_ok();
        (0..n).all(|i| filed(i) || left(i)) && job_dirs(&inbox).is_empty()
    };
    wait_until(Duration::from_secs(60), settled);
    let all = results(&inbox);
    let refused = all.iter().filter(|r| r["status"] == "failed").count();
    for r in &all {
        if r["status"] == "failed" {
            assert_eq!(r["error"]["kind"], "invalid_manifest", "{r}");
        }
    }
    eprintln!(
        "{n} races: {} claimed as a manifest, {refused} claimed as a symlink and refused",
        all.len() - refused
    );
    nothing_shows(&env, &d);
    assert_eq!(d.stop(), 0);
}
