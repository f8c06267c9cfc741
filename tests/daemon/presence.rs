//! Whether a daemon runs: its presence lock per watch folder, as `status` and `submit --wait`
//! see it.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn status(env: &Env) -> Value {
    let out = env
        .concatd()
        .args(["status", "-c", "rules.yaml", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A job folder as a crashed daemon leaves it: claimed, not finished.
fn claimed_job(env: &Env) {
    let job = env.path("in/.work/0190aaaabbbbccccddddeeeeffff0000");
    fs::create_dir_all(&job).unwrap();
    fs::write(
        job.join("left.json"),
        r#"{"output":"left.bin","sources":["a"]}"#,
    )
    .unwrap();
}

#[test]
fn status_says_whether_a_daemon_watches_and_claimed_jobs_only_run_with_one() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"A");
    claimed_job(&env);
    let s = status(&env);
    let r1 = &s["rules"][0];
    assert_eq!(r1["daemon"], Value::Null, "{s}");
    // Left by a dead daemon: waiting for the next start, not running.
    assert_eq!(
        (r1["running"].as_u64(), r1["waiting"].as_u64()),
        (Some(0), Some(1))
    );
    let text = env
        .concatd()
        .args(["status", "-c", "rules.yaml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("none"));

    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let s = status(&env);
    let daemon = &s["rules"][0]["daemon"];
    assert_eq!(daemon["pid"].as_u64(), Some(d.child.id() as u64), "{s}");
    assert!(daemon["since"].as_str().unwrap().ends_with('Z'), "{s}");

    // kill -9: the kernel drops the lock, so the daemon is gone at once, whatever file is left.
    d.kill9();
    assert_eq!(status(&env)["rules"][0]["daemon"], Value::Null);
    // The next daemon sweeps the stale file and announces itself.
    let d = env.start();
    let s = status(&env);
    assert_eq!(
        s["rules"][0]["daemon"]["pid"].as_u64(),
        Some(d.child.id() as u64)
    );
    let presence: Vec<_> = names(&env.path("in/.work"))
        .into_iter()
        .filter(|n| n.starts_with(".daemon-"))
        .collect();
    assert_eq!(presence.len(), 1, "{presence:?}");
    assert_eq!(d.stop(), 0);
    assert_eq!(status(&env)["rules"][0]["daemon"], Value::Null);
    assert!(
        names(&env.path("in/.work")).is_empty(),
        "a clean stop removes its file"
    );
}

#[test]
fn submit_wait_without_a_daemon_exits_at_once_naming_the_folder_and_the_drop_stays() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"A");
    let m = env.path("m.json");
    fs::write(&m, r#"{"output":"w.bin","sources":["a"]}"#).unwrap();
    let started = Instant::now();
    let out = env.submit_wait(&m, None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no daemon is watching"), "{err}");
    assert!(err.contains(&env.path("in").display().to_string()), "{err}");
    assert!(env.path("in/m.json").exists(), "the manifest stays dropped");
    // It runs when a daemon starts.
    let d = env.start();
    wait_until(Duration::from_secs(10), || env.path("out/w.bin").exists());
    assert_eq!(d.stop(), 0);
}

#[test]
fn submit_wait_gives_up_when_the_daemon_dies_while_it_waits() {
    // Polling once an hour: the daemon is alive but will not take the drop before it dies.
    let env = Env::new("    fsync: false\n    poll_interval: 1h\n");
    env.data("a", b"A");
    let d = env.start();
    let m = env.path("m.json");
    fs::write(&m, r#"{"output":"w.bin","sources":["a"]}"#).unwrap();
    let child = env
        .concatd()
        .args(["submit", "-c", "rules.yaml", "--rule", "r1", "--wait"])
        .arg(&m)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), || env.path("in/m.json").exists());
    d.kill9();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon is watching"));
    assert!(env.path("in/m.json").exists(), "the manifest stays dropped");
}

/// `concatd status | head`: a reader that went away is no panic and no error.
#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let env = Env::new("");
    for json in [false, true] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut c = env.concatd();
        c.args(["status", "-c", "rules.yaml"]);
        if json {
            c.arg("--json");
        }
        let out = c.stdout(writer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.is_empty(), "{err}");
    }
}

/// A FIFO named to `submit` is refused at once, not waited on, and nothing is dropped.
#[test]
fn submit_of_a_fifo_is_refused_at_once() {
    let env = Env::new("");
    let fifo = env.path("m.json");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut child = env
        .concatd()
        .args(["submit", "-c", "rules.yaml", "--rule", "r1"])
        .arg(&fifo)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("submit blocked on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("not a regular file") && err.contains("FIFO"),
        "{err}"
    );
    assert!(
        names(&env.path("in")).iter().all(|n| n != "m.json"),
        "nothing dropped"
    );
}
