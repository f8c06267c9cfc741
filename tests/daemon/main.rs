//! The daemon end to end: the real binary, real folders, real signals.
//!
//! - here: taking manifests, many at once, two daemons, `submit`, `status`, `logs`, systemd;
//! - [`recovery`]: crashes, restarts, shutdown aborts, the daemon's own files in a job folder;
//! - [`reload`]: rules changed by SIGHUP or by saving the file;
//! - [`guard`]: output roots that would land in a watch folder, names that forge log lines.

#[path = "../support/mod.rs"]
mod support;

mod crash;
mod guard;
mod inputs;
mod metrics;
mod package;
mod presence;
mod publish;
mod recovery;
mod reload;
mod resume;
mod review;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::*;

#[test]
fn drops_by_write_and_rename_json_and_yaml_ignored_names_untouched() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"hello ");
    env.data("b", b"world");
    let d = env.start();
    let inbox = env.path("in");
    // Written in place: taken on close.
    fs::write(
        inbox.join("w.json"),
        r#"{"output":"w.bin","sources":["a","b"]}"#,
    )
    .unwrap();
    // Renamed in, YAML.
    env.drop_renamed("in", "y.yaml", "output: y.bin\nsources: [b, a]\n");
    let ignored = [".hidden.json", "x.json.tmp", "x.json.part", "x.json~"];
    for n in ignored {
        fs::write(inbox.join(n), r#"{"output":"bad.bin","sources":["a"]}"#).unwrap();
    }
    wait_until(Duration::from_secs(10), || count_results(&inbox) == 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fs::read(env.path("out/w.bin")).unwrap(), b"hello world");
    assert_eq!(fs::read(env.path("out/y.bin")).unwrap(), b"worldhello ");
    assert_eq!(
        names(&inbox.join("done")),
        [
            "w.json",
            "w.json.result.json",
            "y.yaml",
            "y.yaml.result.json"
        ]
    );
    for n in ignored {
        assert!(inbox.join(n).exists(), "{n} was taken");
    }
    assert!(!env.path("out/bad.bin").exists());
    assert_eq!(count_results(&inbox), 2);
    let r: Value =
        serde_json::from_slice(&fs::read(inbox.join("done/w.json.result.json")).unwrap()).unwrap();
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["manifest"], "w.json");
    assert_eq!(r["size"], 11);
    assert_eq!(r["blake3"], blake3::hash(b"hello world").to_hex().as_str());
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_manifest_being_written_is_not_taken_before_close() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"abc");
    let _d = env.start();
    let inbox = env.path("in");
    let text = br#"{"output":"slow.bin","sources":["a","a"]}"#;
    let mut f = fs::File::create(inbox.join("slow.json")).unwrap();
    f.write_all(&text[..10]).unwrap();
    f.flush().unwrap();
    // Half written and still open for a while: not taken (a claim would move it to .work/ and
    // fail it as invalid_manifest).
    std::thread::sleep(Duration::from_millis(1000));
    assert!(inbox.join("slow.json").exists(), "taken while still open");
    assert!(job_dirs(&inbox).is_empty(), "claimed while open");
    assert_eq!(count_results(&inbox), 0, "a result while still open");
    f.write_all(&text[10..]).unwrap();
    drop(f);
    wait_until(Duration::from_secs(10), || count_results(&inbox) == 1);
    assert_eq!(
        results(&inbox)[0]["status"],
        "succeeded",
        "{}",
        results(&inbox)[0]
    );
    assert_eq!(fs::read(inbox.join("done/slow.json")).unwrap(), text);
    assert_eq!(fs::read(env.path("out/slow.bin")).unwrap(), b"abcabc");
}

/// Drop `n` manifests (renamed in); manifest i writes `o/i.bin` from source `s{i % 10}`.
fn drop_many(env: &Env, n: usize) -> Vec<Vec<u8>> {
    let sources: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("source {i}\n").repeat(50).into_bytes())
        .collect();
    for (i, s) in sources.iter().enumerate() {
        env.data(&format!("s{i}"), s);
    }
    for i in 0..n {
        env.drop_renamed(
            "in",
            &format!("m{i:04}.json"),
            &format!(r#"{{"output":"o/{i}.bin","sources":["s{}"]}}"#, i % 10),
        );
    }
    sources
}

fn check_many(env: &Env, n: usize, sources: &[Vec<u8>]) {
    let inbox = env.path("in");
    let all = results(&inbox);
    assert_eq!(all.len(), n);
    let ok = all.iter().filter(|r| r["status"] == "succeeded").count();
    assert_eq!(
        ok, n,
        "every job ran once (a second run would fail output_exists)"
    );
    let ids: HashSet<&str> = all.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), n);
    let manifests: HashSet<&str> = all
        .iter()
        .map(|r| r["manifest"].as_str().unwrap())
        .collect();
    assert_eq!(manifests.len(), n);
    for i in 0..n {
        assert_eq!(
            fs::read(env.path(&format!("out/o/{i}.bin"))).unwrap(),
            sources[i % 10]
        );
    }
    assert_eq!(
        names(&env.path("out/o")).len(),
        2 * n,
        "outputs and sidecars only"
    );
    wait_until(Duration::from_secs(5), || job_dirs(&inbox).is_empty());
    assert_eq!(names(&inbox.join("done")).len(), 2 * n);
    assert!(names(&inbox.join("failed")).is_empty());
}

#[test]
fn five_hundred_manifests_at_once_each_done_exactly_once() {
    let env = Env::new("    fsync: false\n    concurrency: 2\n");
    let d = env.start();
    let sources = drop_many(&env, 500);
    wait_until(Duration::from_secs(40), || {
        count_results(&env.path("in")) >= 500
    });
    std::thread::sleep(Duration::from_millis(200));
    check_many(&env, 500, &sources);
    assert_eq!(d.stop(), 0);
}

#[test]
fn two_daemons_on_one_folder_run_each_manifest_once() {
    let env = Env::new("    fsync: false\n");
    let a = env.start_named("a");
    let b = env.start_named("b");
    let sources = drop_many(&env, 200);
    wait_until(Duration::from_secs(40), || {
        count_results(&env.path("in")) >= 200
    });
    std::thread::sleep(Duration::from_millis(300));
    check_many(&env, 200, &sources);
    // Both took a share (not a requirement, but two idle daemons racing should).
    let claimed = |d: &Daemon| d.log().matches(" claimed").count();
    assert_eq!(claimed(&a) + claimed(&b), 200);
    assert_eq!(a.stop(), 0);
    assert_eq!(b.stop(), 0);
}

#[test]
fn manifests_dropped_while_down_are_taken_at_start() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"x");
    let d = env.start();
    assert_eq!(d.stop(), 0);
    for i in 0..3 {
        env.drop_renamed(
            "in",
            &format!("d{i}.json"),
            &format!(r#"{{"output":"d{i}","sources":["a"]}}"#),
        );
    }
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 3
    });
    for i in 0..3 {
        assert_eq!(fs::read(env.path(&format!("out/d{i}"))).unwrap(), b"x");
    }
    assert_eq!(d.stop(), 0);
}

#[test]
fn submit_wait_exit_codes_and_timeout() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"S");
    let m = env.path("m.json");
    // No daemon yet: --wait exits 1 at once (see presence.rs); the drop stays and runs later.
    fs::write(&m, r#"{"output":"s1.bin","sources":["a"]}"#).unwrap();
    let out = env.submit_wait(&m, Some("30s"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon is watching"));
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    // Same name again: filed with a suffix, and --wait finds its own result.
    fs::write(&m, r#"{"output":"s2.bin","sources":["a","a"]}"#).unwrap();
    let out = env.submit_wait(&m, Some("10s"));
    assert_exit(&out, 0);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "succeeded");
    assert!(r["output"].as_str().unwrap().ends_with("s2.bin"));
    assert!(env.path("in/done/m-1.json.result.json").exists());
    // A failing job: exit 1, the failed result printed.
    fs::write(&m, r#"{"output":"s3.bin","sources":["missing"]}"#).unwrap();
    let out = env.submit_wait(&m, None);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["error"]["kind"], "source_not_found");
    // status --json counts them.
    let out = env
        .concatd()
        .args(["status", "-c", "rules.yaml", "--json"])
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r1 = &s["rules"][0];
    assert_eq!(r1["name"], "r1");
    assert_eq!(
        (r1["waiting"].as_u64(), r1["running"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        (r1["done"].as_u64(), r1["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(r1["latest"].as_array().unwrap().len(), 3);
    assert_eq!(d.stop(), 0);
}

/// Two `submit`s of one name at once: one drops its manifest, the other fails; the dropped
/// manifest holds exactly the bytes of the one that said so (no daemon: the drop stays put).
#[test]
fn concurrent_submits_of_one_name_never_mix_manifests() {
    let env = Env::new("    fsync: false\n");
    let inbox = env.path("in");
    // Big manifests, so that the writes overlap.
    let mut sent = Vec::new();
    for who in ["a", "b"] {
        fs::create_dir(env.path(who)).unwrap();
        let pad = who.repeat(4 << 20);
        let text = format!(r#"{{"output":"{who}.bin","sources":["{pad}"]}}"#);
        fs::write(env.path(who).join("m.json"), &text).unwrap();
        sent.push(text.into_bytes());
    }
    for round in 0..20 {
        let children: Vec<_> = ["a", "b"]
            .iter()
            .map(|who| {
                env.concatd()
                    .args(["submit", "-c", "rules.yaml", "--rule", "r1"])
                    .arg(env.path(who).join("m.json"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let codes: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let winners: Vec<usize> = (0..2)
            .filter(|&i| codes[i].status.code() == Some(0))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {codes:?}");
        let dropped = fs::read(inbox.join("m.json")).unwrap();
        assert!(
            dropped == sent[winners[0]],
            "round {round}: the manifest dropped is not the one submit {} sent",
            ["a", "b"][winners[0]]
        );
        let loser = 1 - winners[0];
        assert_eq!(codes[loser].status.code(), Some(1), "round {round}");
        assert!(
            String::from_utf8_lossy(&codes[loser].stderr).contains("already waiting"),
            "round {round}: {}",
            String::from_utf8_lossy(&codes[loser].stderr)
        );
        assert_eq!(names(&inbox), ["m.json"], "round {round}: temporaries left");
        fs::remove_file(inbox.join("m.json")).unwrap();
    }
}

/// Manifest names as long as a file name may be (255 bytes) get their one result: the job
/// folder's own files have short names, and the names filed under are shortened to fit.
#[test]
fn long_manifest_names_are_done_with_one_result() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"long");
    let inbox = env.path("in");
    let d = env.start();
    // 250 bytes, written in place.
    let first = format!("{}.json", "a".repeat(245));
    assert_eq!(first.len(), 250);
    fs::write(inbox.join(&first), r#"{"output":"l1.bin","sources":["a"]}"#).unwrap();
    wait_until(Duration::from_secs(10), || count_results(&inbox) == 1);
    // 255 bytes of two-byte characters, through `submit --wait`.
    let second = format!("{}.yaml", "\u{e9}".repeat(125));
    assert_eq!(second.len(), 255);
    fs::create_dir(env.path("m")).unwrap();
    let m = env.path("m").join(&second);
    fs::write(&m, "output: l2.bin\nsources: [a, a]\n").unwrap();
    let out = env.submit_wait(&m, Some("10s"));
    assert_exit(&out, 0);
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["manifest"], second.as_str());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fs::read(env.path("out/l1.bin")).unwrap(), b"long");
    assert_eq!(fs::read(env.path("out/l2.bin")).unwrap(), b"longlong");
    let done = names(&inbox.join("done"));
    assert_eq!(done.len(), 4, "{done:?}");
    for name in [&first, &second] {
        let results: Vec<Value> = results(&inbox)
            .into_iter()
            .filter(|r| r["manifest"] == name.as_str())
            .collect();
        assert_eq!(results.len(), 1, "{name}: {done:?}");
        assert_eq!(results[0]["status"], "succeeded");
    }
    // Each manifest beside its result, the YAML one still named .yaml.
    for n in done.iter().filter(|n| !n.ends_with(".result.json")) {
        assert!(done.contains(&format!("{n}.result.json")), "{done:?}");
        assert!(n.len() + ".result.json".len() <= 255);
    }
    assert!(done.iter().any(|n| n.ends_with(".yaml")), "{done:?}");
    assert!(job_dirs(&inbox).is_empty());
    assert_eq!(count_results(&inbox), 2);
    assert_eq!(d.stop(), 0);
}

#[test]
fn the_rule_log_holds_every_job_id_and_logs_prints_it() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"L");
    let d = env.start();
    for i in 0..3 {
        env.drop_renamed(
            "in",
            &format!("l{i}.json"),
            &format!(r#"{{"output":"l{i}","sources":["a"]}}"#),
        );
    }
    env.drop_renamed("in", "bad.json", r#"{"output":"l0","sources":["a"]}"#);
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 4
    });
    assert_eq!(d.stop(), 0); // flushes the log
    let log = fs::read_to_string(env.path("logs/r1.log")).unwrap();
    for r in results(&env.path("in")) {
        let id = r["job_id"].as_str().unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        assert!(lines.iter().any(|l| l.contains("claimed")), "{id}: {log}");
        assert!(lines.iter().any(|l| l.contains("result filed")), "{id}");
        if r["status"] == "succeeded" {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("published") && l.contains("mib_per_s="))
            );
        } else {
            assert!(lines.iter().any(|l| l.contains("output_exists")));
        }
    }
    let out = env
        .concatd()
        .args(["logs", "-c", "rules.yaml", "r1", "-n", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let last: Vec<&str> = log.lines().rev().take(2).collect();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        last.into_iter().rev().collect::<Vec<_>>()
    );
}

#[test]
fn a_polling_rule_takes_a_file_once_it_holds_still() {
    let env = Env::new("    fsync: false\n    poll_interval: 100ms\n");
    env.data("a", b"P");
    let d = env.start();
    fs::write(
        env.path("in/p.json"),
        r#"{"output":"p.bin","sources":["a","a"]}"#,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(fs::read(env.path("out/p.bin")).unwrap(), b"PP");
    assert_eq!(d.stop(), 0);
}

#[test]
fn logs_follow_goes_on_across_rotation() {
    let env = Env::new("");
    let live = env.path("logs/r1.log");
    fs::write(&live, "one\ntwo\nthree\n").unwrap();
    let mut child = env
        .concatd()
        .args(["logs", "-c", "rules.yaml", "r1", "-f", "-n", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // Rotate as the daemon does: a last line to the old file, rename, a new live file.
    fs::OpenOptions::new()
        .append(true)
        .open(&live)
        .unwrap()
        .write_all(b"four\n")
        .unwrap();
    fs::rename(&live, env.path("logs/r1.log.2026-01-01")).unwrap();
    fs::write(&live, "five\n").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "two\nthree\nfour\nfive\n"
    );
}

#[test]
fn jobs_run_in_arrival_order_under_the_global_cap() {
    let env = Env::new("    concurrency: 2\n");
    env.write_rules(&format!(
        "log_dir: logs\nmax_jobs: 1\nrules:\n{}{}",
        rule("r1", "in", "    concurrency: 2\n"),
        rule("r2", "in2", "    concurrency: 2\n")
    ));
    env.data("a", &vec![7u8; 1 << 20]);
    let d = env.start();
    // Names in reverse alphabetical order, alternating rules.
    let mut order = Vec::new();
    for i in (0..12).rev() {
        for folder in ["in", "in2"] {
            let name = format!("j{i:02}.json");
            let out = format!("{folder}-{i}.bin");
            env.drop_renamed(
                folder,
                &name,
                &format!(r#"{{"output":"{out}","sources":["a"]}}"#),
            );
            order.push((folder, name));
        }
    }
    wait_until(Duration::from_secs(30), || {
        count_results(&env.path("in")) + count_results(&env.path("in2")) == 24
    });
    let mut all: Vec<Value> = results(&env.path("in"));
    all.extend(results(&env.path("in2")));
    assert!(all.iter().all(|r| r["status"] == "succeeded"));
    // max_jobs 1: no two jobs overlap (times are truncated to ms, so touching ends are fine).
    let span = |r: &Value| {
        (
            r["started_at"].as_str().unwrap().to_owned(),
            r["finished_at"].as_str().unwrap().to_owned(),
        )
    };
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let ((s1, f1), (s2, f2)) = (span(a), span(b));
            assert!(!(s1 < f2 && s2 < f1), "overlap: {a} {b}");
        }
    }
    // Within a rule, started in the order dropped.
    for (rule, folder) in [("r1", "in"), ("r2", "in2")] {
        let mut mine: Vec<&Value> = all.iter().filter(|r| r["rule"] == rule).collect();
        mine.sort_by_key(|r| span(r).0);
        let started: Vec<&str> = mine
            .iter()
            .map(|r| r["manifest"].as_str().unwrap())
            .collect();
        let dropped: Vec<&str> = order
            .iter()
            .filter(|(f, _)| *f == folder)
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(started, dropped);
    }
    assert_eq!(d.stop(), 0);
}

#[test]
fn systemd_hears_ready_then_watchdog_keep_alives() {
    let env = Env::new("");
    let socket_path = env.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
        .args(["run", "-c"])
        .arg(env.rules())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while heard
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 2
    {
        let n = socket.recv(&mut buf).expect("a notification");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(heard[0].contains("READY=1"), "{heard:?}");
    // READY comes after the rule was set up (its folders exist, its watch is armed).
    assert!(env.path("in/.work").is_dir());
    std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
