//! Guards at the edges: an `output_root` that would publish into a watch folder's own files, and
//! names that try to forge lines in the logs.

use std::fs;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use crate::support::*;

/// `check` exits 2 naming the rule and `output_root`; `run` refuses to start the same way.
fn refused(env: &Env, rules: &str, rule: &str) {
    env.write_rules(rules);
    let out = env
        .concatd()
        .args(["check", "-c", "rules.yaml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check accepted:\n{rules}\n{err}"
    );
    assert!(
        err.contains(&format!("rule '{rule}': key 'output_root'")),
        "{rules}\n{err}"
    );
    let out = env
        .concatd()
        .args(["run", "-c", "rules.yaml"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "run started:\n{rules}\n{err}");
    assert!(err.contains("key 'output_root'"), "{rules}\n{err}");
    assert!(!err.contains(" ready"), "{err}");
}

fn one_rule(watch: &str, output_root: &str) -> String {
    format!(
        "log_dir: logs\nrules:\n  - name: a\n    watch: {watch}\n    output_root: {output_root}\n    source_root: data\n"
    )
}

#[test]
fn an_output_root_inside_a_watch_folder_is_refused_by_check_and_run() {
    let env = Env::new("");
    // The daemon's own subfolders exist once it has run.
    for d in [
        "in/.work",
        "in/done",
        "in/failed",
        "in/sub",
        "in2/.work",
        "in2/done",
    ] {
        fs::create_dir_all(env.path(d)).unwrap();
    }
    for root in [
        "in/.work",
        "in/done",
        "in/failed",
        "in",
        "in/sub",
        "in/./done/../.work",
    ] {
        refused(&env, &one_rule("in", root), "a");
    }
    // Paths are compared after resolving symlinks: a link to the watch folder's done/.
    std::os::unix::fs::symlink(env.path("in/done"), env.path("link")).unwrap();
    refused(&env, &one_rule("in", "link"), "a");
    // A watch folder reached through a symlink, too.
    std::os::unix::fs::symlink(env.path("in"), env.path("inlink")).unwrap();
    refused(&env, &one_rule("inlink", "in/.work"), "a");
    // A watch folder whose done/ is a symlink elsewhere: that elsewhere is the watch's too.
    fs::create_dir_all(env.path("in3")).unwrap();
    fs::create_dir_all(env.path("archive/2026")).unwrap();
    std::os::unix::fs::symlink("../archive", env.path("in3/done")).unwrap();
    refused(&env, &one_rule("in3", "archive/2026"), "a");

    // Across rules: rule a's output_root inside rule b's watch folder or its .work/.
    for root in ["in2/.work", "in2/done", "in2"] {
        let text = format!(
            "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: {root}\n  - name: b\n    watch: in2\n    output_root: out\n"
        );
        refused(&env, &text, "a");
    }

    // Beside the watch folder is fine.
    env.write_rules(&one_rule("in", "out"));
    let out = env
        .concatd()
        .args(["check", "-c", "rules.yaml"])
        .output()
        .unwrap();
    assert_exit(&out, 0);
}

#[test]
fn a_log_dir_inside_a_watch_folder_is_refused() {
    let env = Env::new("");
    for logs in ["in", "in/logs", "in/.work"] {
        env.write_rules(&format!(
            "log_dir: {logs}\nrules:\n  - name: a\n    watch: in\n    output_root: out\n"
        ));
        let out = env
            .concatd()
            .args(["check", "-c", "rules.yaml"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "log_dir {logs} accepted: {err}");
        assert!(err.contains("key 'log_dir'"), "{err}");
    }
}

/// A name carrying a newline, a forged log line, ANSI sequences (ESC and the one-byte C1 CSI),
/// a carriage return, a tab and a backslash.
const EVIL: &str = "evil\n2026-12-01T00:00:00Z  INFO forged\x1b[31m\u{9b}2J\r\t\\";

/// Every line starts with a time stamp of this test's run and a level, carries no control
/// character, and the forged text appears only escaped.
fn assert_well_formed(what: &str, text: &str, since: SystemTime) {
    assert!(!text.is_empty(), "{what} is empty");
    let until = SystemTime::now() + Duration::from_secs(2);
    let since = since - Duration::from_secs(2);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let stamp = words.next().unwrap_or_default();
        let t = humantime::parse_rfc3339(stamp)
            .unwrap_or_else(|e| panic!("{what}: line without a time stamp ({e}): {line:?}"));
        assert!(
            t >= since && t <= until,
            "{what}: forged time stamp: {line:?}"
        );
        let level = words.next().unwrap_or_default();
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{what}: no level: {line:?}"
        );
        assert!(
            !line.chars().any(|c| c.is_control()),
            "{what}: a control character: {line:?}"
        );
        if line.contains("forged") {
            assert!(
                line.contains(r"evil\n2026-12-01T00:00:00Z  INFO forged\x1b[31m\u{9b}2J\r\t\\"),
                "{what}: not escaped: {line:?}"
            );
        }
    }
    assert!(text.contains("forged"), "{what} does not name the manifest");
}

#[test]
fn names_with_newlines_and_escapes_cannot_forge_log_lines() {
    let since = SystemTime::now();
    let env = Env::new("    fsync: false\n");
    env.data("a", b"A");
    let d = env.start();
    let good = format!("{EVIL}.json");
    env.drop_renamed("in", &good, r#"{"output":"good.bin","sources":["a"]}"#);
    // A source whose name forges too: its error message carries the name.
    let bad = format!("{EVIL}-bad.json");
    let text = serde_json::json!({"output": "bad.bin", "sources": [format!("a{EVIL}")]});
    env.drop_renamed("in", &bad, &text.to_string());
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 2
    });
    let all = results(&env.path("in"));
    assert!(
        all.iter()
            .any(|r| r["manifest"] == good.as_str() && r["status"] == "succeeded")
    );
    assert!(
        all.iter()
            .any(|r| r["manifest"] == bad.as_str() && r["status"] == "failed")
    );
    wait_until(Duration::from_secs(10), || {
        fs::read_to_string(env.path("logs/r1.log")).is_ok_and(|l| l.matches("forged").count() >= 4)
    });
    assert_eq!(d.stop(), 0);

    let log = fs::read_to_string(env.path("logs/r1.log")).unwrap();
    assert_well_formed("rule log", &log, since);
    let stderr = fs::read_to_string(env.path("daemon.stderr")).unwrap();
    assert_well_formed("daemon stderr", &stderr, since);

    let out = env
        .concatd()
        .args(["logs", "-c", "rules.yaml", "r1", "-n", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_well_formed(
        "concatd logs",
        &String::from_utf8(out.stdout).unwrap(),
        since,
    );

    // A foreground command's stderr: the same subscriber discipline.
    let out = env
        .concatd()
        .args(["once", "-c", "rules.yaml", "--rule", "r1"])
        .arg(env.path("in/failed").join(&bad))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_well_formed(
        "once stderr",
        &String::from_utf8(out.stderr).unwrap(),
        since,
    );
}
