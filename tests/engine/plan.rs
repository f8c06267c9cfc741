//! `concatd plan` (everything a job decides, no byte moved, every refusal listed), the resolved
//! path in errors about relative sources, and a job's log staying short whatever its size.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

use super::{Env, bytes, json, walk};

impl Env {
    /// Run `concatd plan` (with `--json` when asked); exit code, stdout, stderr.
    fn plan(&self, name: &str, manifest: &str, as_json: bool) -> (i32, String, String) {
        let m = self.path(name);
        std::fs::write(&m, manifest).unwrap();
        let mut cmd = Command::cargo_bin("concatd").unwrap();
        cmd.args(["plan", "-c"])
            .arg(self.path("rules.yaml"))
            .args(["--rule", "t"])
            .arg(&m);
        if as_json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    pub(crate) fn plan_json(&self, name: &str, manifest: &str) -> (i32, Value) {
        let (code, stdout, stderr) = self.plan(name, manifest, true);
        let v = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}"));
        (code, v)
    }
}

#[test]
fn plan_of_a_good_manifest_moves_no_byte() {
    let env = Env::new("");
    let a = bytes(1, 5000);
    let b = bytes(2, 7 << 20);
    env.data("a", &a);
    env.data("sub/b", &b);
    env.data("list.txt", b"a\n");
    let m = json(serde_json::json!({
        "output": "deep/er/x.bin",
        "sources": ["a", {"path": "sub/b", "offset": 100, "length": 6_000_000}, {"path": "a", "offset": 4000}],
        "source_lists": ["list.txt"]
    }));
    let (code, p) = env.plan_json("m.json", &m);
    assert_eq!(code, 0, "{p:#}");
    assert_eq!(p["status"], "planned");
    let total = 5000 + 6_000_000 + 1000 + 5000;
    assert_eq!(p["size"], total);
    assert_eq!(p["source_count"], 4);
    assert_eq!(
        p["output"],
        env.path("out/deep/er/x.bin").display().to_string()
    );
    assert_eq!(p["overwrite"], false);
    let s = p["sources"].as_array().unwrap();
    assert_eq!(s.len(), 4);
    let col = |key: &str| s.iter().map(|x| x[key].clone()).collect::<Vec<_>>();
    assert_eq!(col("number"), [1, 2, 3, 4].map(Value::from));
    assert_eq!(
        col("output_offset"),
        [0, 5000, 6_005_000, 6_006_000].map(Value::from)
    );
    assert_eq!(col("offset"), [0, 100, 4000, 0].map(Value::from));
    assert_eq!(
        col("length"),
        [5000, 6_000_000, 1000, 5000].map(Value::from)
    );
    assert_eq!(
        col("object_size"),
        [5000, 7 << 20, 5000, 5000].map(Value::from)
    );
    assert_eq!(s[1]["location"], "sub/b");
    assert_eq!(
        s[1]["resolved"],
        env.path("data/sub/b").display().to_string()
    );
    let ino =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(env.path("data/sub/b")).unwrap());
    assert_eq!(s[1]["pin"]["kind"], "local");
    assert_eq!(s[1]["pin"]["ino"], ino);
    assert_eq!(s[1]["pin"]["size"], 7 << 20);
    assert!(s[1]["pin"]["mtime"].as_str().unwrap().ends_with('Z'));
    // A local output: its pieces, every byte through this host, none copied server-side.
    assert_eq!(p["parts"]["target"], "local_file");
    assert_eq!(p["parts"]["piece_size"], 4 << 20);
    assert_eq!(p["parts"]["count"], 2);
    assert_eq!(p["parts"]["bytes_through_host"], total);
    assert_eq!(p["parts"]["copied_bytes"], 0);
    // Nothing written: no output, no temporary file, not even the output's folders.
    assert!(
        walk(&env.path("out")).is_empty(),
        "{:?}",
        walk(&env.path("out"))
    );

    // The human form: a table with one row per source.
    let (code, text, _) = env.plan("m.json", &m, false);
    assert_eq!(code, 0);
    assert!(text.contains("6011000"), "{text}");
    let rows: Vec<_> = text.lines().filter(|l| l.contains("sub/b")).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(
        rows[0].contains("6000000") && rows[0].contains("5000"),
        "{text}"
    );
    assert!(walk(&env.path("out")).is_empty());
}

#[test]
fn plan_lists_every_refusal_with_its_source_number() {
    let env = Env::new("    max_output_size: 1KiB\n");
    env.data("a", &bytes(3, 700));
    env.data("short", &bytes(4, 10));
    std::fs::create_dir(env.path("data/dir")).unwrap();
    std::fs::write(env.path("outside/secret"), b"s").unwrap();
    std::fs::write(env.path("out/taken"), b"old").unwrap();
    let secret = env.path("outside/secret").display().to_string();
    let m = json(serde_json::json!({
        "output": "taken",
        "sources": ["a", "missing", "a", {"path": "short", "length": 50}, secret, "dir", "a"],
        "expect": {"size": 1}
    }));
    let (code, r) = env.plan_json("m.json", &m);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["status"], "failed");
    let problems = r["error"]["problems"].as_array().unwrap();
    let found: Vec<_> = problems
        .iter()
        .map(|p| (p["kind"].as_str().unwrap(), p["source_index"].as_u64()))
        .collect();
    assert_eq!(
        found,
        [
            ("output_exists", None),
            ("source_not_found", Some(2)),
            ("size_mismatch", Some(4)),
            ("source_not_allowed", Some(5)),
            ("source_not_regular", Some(6)),
            ("too_large", None),
        ],
        "{r:#}"
    );
    // The error itself is the first problem's: still a valid failed result.
    assert_eq!(r["error"]["kind"], "output_exists");
    assert_eq!(r["error"]["message"], problems[0]["message"]);
    assert!(r["error"].get("source_index").is_none());
    assert_eq!(std::fs::read(env.path("out/taken")).unwrap(), b"old");

    // Every source measured: too large and unequal to expect.size, both said.
    let m = json(serde_json::json!({"output": "o1", "sources": ["a", "a"], "expect": {"size": 1}}));
    let (code, r) = env.plan_json("m1.json", &m);
    assert_eq!(code, 1);
    let kinds: Vec<_> = r["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["too_large", "size_mismatch"], "{r:#}");

    // Without the output problem, the first source problem leads, with its number.
    let m = json(serde_json::json!({"output": "new", "sources": ["a", "x1", "x2"]}));
    let (code, r) = env.plan_json("m2.json", &m);
    assert_eq!(code, 1);
    assert_eq!(r["error"]["kind"], "source_not_found");
    assert_eq!(r["error"]["source_index"], 2);
    assert_eq!(r["error"]["problems"].as_array().unwrap().len(), 2);
    assert!(!env.path("out/new").exists());

    // A run of the first manifest stops at the first problem and reports one error, as before.
    let m = json(serde_json::json!({"output": "o2", "sources": ["a", "missing", "dir"]}));
    let (code, r) = env.once("m3.json", &m);
    assert_eq!(code, 1);
    assert_eq!(r["error"]["kind"], "source_not_found");
    assert!(r["error"].get("problems").is_none(), "{r:#}");
}

#[test]
fn plan_agrees_with_once() {
    let env = Env::new("");
    let mut names = Vec::new();
    for i in 0..300u64 {
        env.data(&format!("p{i}"), &bytes(i, (i as usize * 131) % 20_000));
        names.push(format!("p{i}"));
    }
    let list: String = names.iter().rev().map(|n| format!("{n}\n")).collect();
    env.data("list.txt", list.as_bytes());
    let m = json(serde_json::json!({
        "output": "agree.bin",
        "sources": names,
        "source_lists": ["list.txt"]
    }));
    let (code, p) = env.plan_json("m.json", &m);
    assert_eq!(code, 0, "{p:#}");
    let (code, r) = env.once("m.json", &m);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(p["size"], r["size"]);
    assert_eq!(p["source_count"], r["sources"]);
    assert_eq!(p["output"], r["output"]);
    assert_eq!(p["write_mode"], r["write_mode"]);
    // Each source sits where plan said: its bytes are at its output offset.
    let out = std::fs::read(env.path("out/agree.bin")).unwrap();
    for s in p["sources"].as_array().unwrap() {
        let at = s["output_offset"].as_u64().unwrap() as usize;
        let len = s["length"].as_u64().unwrap() as usize;
        let src = std::fs::read(s["resolved"].as_str().unwrap()).unwrap();
        assert!(
            out[at..at + len] == src[..],
            "source {} misplaced",
            s["number"]
        );
    }
    // Once the output exists, plan says so, as a run would.
    let (code, p) = env.plan_json("m.json", &m);
    assert_eq!(code, 1);
    assert_eq!(p["error"]["kind"], "output_exists");
    let (code, r) = env.once("m.json", &m);
    assert_eq!((code, &r["error"]["kind"]), (1, &p["error"]["kind"]));
}

#[test]
fn errors_about_relative_sources_show_the_resolved_path() {
    let env = Env::new("");
    env.data("a", b"a");
    env.data("list.txt", b"a\nb00\n");
    let data = env.path("data");
    // Inline.
    let r = env.fails(
        "m.json",
        r#"{"output":"o","sources":["a","zz"]}"#,
        "source_not_found",
        "o",
    );
    let want = format!(
        "source 2: zz (resolved to {}): not found (No such file or directory)",
        data.join("zz").display()
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.ends_with(&want), "{message}");
    // In a source list: numbered after the inline sources.
    let r = env.fails(
        "m2.json",
        r#"{"output":"o","sources":["a"],"source_lists":["list.txt"]}"#,
        "source_not_found",
        "o",
    );
    let want = format!(
        "source 3: b00 (resolved to {}): not found (No such file or directory)",
        data.join("b00").display()
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.ends_with(&want), "{message}");
    // A directory and a path leaving source_root: the resolved path too.
    std::fs::create_dir(data.join("d")).unwrap();
    let r = env.fails(
        "m3.json",
        r#"{"output":"o","sources":["d"]}"#,
        "source_not_regular",
        "o",
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("d (resolved to {})", data.join("d").display())),
        "{message}"
    );
    std::fs::write(env.path("outside/x"), b"x").unwrap();
    let r = env.fails(
        "m4.json",
        r#"{"output":"o","sources":["../outside/x"]}"#,
        "source_not_allowed",
        "o",
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("(resolved to "), "{message}");
    // An absolute path is shown as written: it is its own resolution.
    let abs = data.join("nope").display().to_string();
    let r = env.fails(
        "m5.json",
        &json(serde_json::json!({"output": "o", "sources": [abs]})),
        "source_not_found",
        "o",
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(!message.contains("resolved to"), "{message}");
}

/// A daemon in `env`'s folders (rule `t`), its stderr in `daemon.stderr`.
fn start_daemon(env: &Env, rust_log: &str) -> std::process::Child {
    let child = Command::cargo_bin("concatd")
        .unwrap()
        .args(["run", "-c"])
        .arg(env.path("rules.yaml"))
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path("daemon.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_for(|| read(&env.path("daemon.stderr")).contains(" ready"));
    child
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
}

/// Runs a 5,000-source job in the daemon; returns the job's lines in the rule log and on the
/// daemon's stderr.
fn job_of_5000_sources(rust_log: &str) -> (Vec<String>, Vec<String>) {
    let env = Env::new("");
    let mut names = Vec::new();
    for i in 0..5000u64 {
        env.data(&format!("s{i}"), &bytes(i, 3));
        names.push(format!("s{i}"));
    }
    let child = start_daemon(&env, rust_log);
    let m = json(serde_json::json!({"output": "many.bin", "sources": names}));
    std::fs::write(env.path(".m.json.part"), m).unwrap();
    std::fs::rename(env.path(".m.json.part"), env.path("in/m.json")).unwrap();
    let result = env.path("in/done/m.json.result.json");
    wait_for(|| result.exists());
    let r: Value = serde_json::from_str(&read(&result)).unwrap();
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let job_id = r["job_id"].as_str().unwrap().to_owned();
    stop(child);
    let of_job = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(&job_id))
            .map(str::to_owned)
            .collect()
    };
    (
        of_job(read(&env.path("logs/t.log"))),
        of_job(read(&env.path("daemon.stderr"))),
    )
}

#[test]
fn a_job_of_5000_sources_logs_a_few_lines() {
    let (lines, stderr) = job_of_5000_sources("info");
    assert!(
        lines.len() < 20,
        "{} lines for the job:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(lines.iter().any(|l| l.contains("planned")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("published")), "{lines:?}");
    assert!(stderr.len() < 20, "{} lines on stderr", stderr.len());
}

/// Per-source detail is there for who asks: on stderr at `RUST_LOG=debug` (the rule log keeps
/// its info level, so it stays short).
#[test]
fn per_source_lines_at_debug_level() {
    let (lines, stderr) = job_of_5000_sources("debug");
    let planned = stderr
        .iter()
        .filter(|l| l.contains("source planned"))
        .count();
    assert_eq!(planned, 5000, "{} lines on stderr", stderr.len());
    assert!(lines.len() < 20, "{} lines in the rule log", lines.len());
}

/// A loopback server answering every request like a HEAD of a 1234-byte object with validators.
fn head_server() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = (&stream).write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"v1\"\r\n\
                  Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\nConnection: close\r\n\r\n",
            );
        }
    });
    port
}

#[test]
fn plan_shows_a_remote_source_with_its_validators() {
    let port = head_server();
    let env = Env::new(&format!(
        "    allow:\n      paths: [data]\n      urls: [\"http://127.0.0.1:{port}/\"]\n"
    ));
    env.data("a", &bytes(9, 10));
    let url = format!("http://127.0.0.1:{port}/obj.bin");
    let m =
        json(serde_json::json!({"output": "r.bin", "sources": ["a", {"url": url, "offset": 34}]}));
    let (code, p) = env.plan_json("m.json", &m);
    assert_eq!(code, 0, "{p:#}");
    assert_eq!(p["size"], 10 + 1200);
    let s = &p["sources"][1];
    assert_eq!(s["location"], url.as_str());
    assert!(s.get("resolved").is_none());
    assert_eq!(
        (s["output_offset"].as_u64(), s["length"].as_u64()),
        (Some(10), Some(1200))
    );
    assert_eq!(s["pin"]["kind"], "remote");
    assert_eq!(s["pin"]["etag"], "\"v1\"");
    assert_eq!(s["pin"]["last_modified"], "Tue, 01 Dec 2026 10:00:00 GMT");
    assert_eq!(s["pin"]["size"], 1234);
    assert!(walk(&env.path("out")).is_empty());
}
