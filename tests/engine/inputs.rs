//! How manifests and source lists are read: never through a link the daemon did not make, never
//! blocking on a FIFO, every line and element of a list bounded, the number of inline sources
//! bounded, NUL bytes refused, and errors that name the manifest as given without echoing it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

use super::Env;

/// `concatd once` on `path` (any kind of file), killed if it takes longer than `limit`.
fn once_path(env: &Env, path: &std::path::Path, limit: Duration) -> (i32, Value, Duration) {
    let start = Instant::now();
    let mut child = Command::cargo_bin("concatd")
        .unwrap()
        .args(["once", "-c"])
        .arg(env.path("rules.yaml"))
        .args(["--rule", "t"])
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "concatd once on {} did not return within {limit:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = start.elapsed();
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json, took)
}

fn message(r: &Value) -> &str {
    r["error"]["message"].as_str().unwrap()
}

#[test]
fn once_on_a_fifo_returns_at_once_with_a_failed_result_naming_it() {
    let env = Env::new("");
    let fifo = env.path("m.json");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let (code, r, _) = once_path(&env, &fifo, Duration::from_secs(10));
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["error"]["kind"], "invalid_manifest", "{r:#}");
    let m = message(&r);
    assert!(m.contains("not a regular file"), "{m}");
    assert!(
        m.contains(&fifo.display().to_string()),
        "names the path given: {m}"
    );
}

#[test]
fn once_follows_a_symlink_the_operator_named() {
    let env = Env::new("");
    env.data("a", b"linked");
    std::fs::write(env.path("real.json"), r#"{"output":"o","sources":["a"]}"#).unwrap();
    std::os::unix::fs::symlink(env.path("real.json"), env.path("link.json")).unwrap();
    let (code, r, _) = once_path(&env, &env.path("link.json"), Duration::from_secs(20));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(std::fs::read(env.path("out/o")).unwrap(), b"linked");
}

#[test]
fn a_nul_byte_in_a_source_path_is_an_invalid_manifest_naming_the_source() {
    let env = Env::new("");
    env.data("a", b"a");
    env.data("b", b"b");
    let r = env.fails(
        "m.json",
        r#"{"output":"o","sources":["a","b","x\u0000y"]}"#,
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(
        m.contains("source 3: a path may not contain a NUL byte"),
        "{m}"
    );
    let r = env.fails(
        "n.json",
        r#"{"output":"o","sources":["a",{"path":"b\u0000"}]}"#,
        "invalid_manifest",
        "o",
    );
    assert!(
        message(&r).contains("source 2: a path may not contain a NUL byte"),
        "{r:#}"
    );
}

#[test]
fn a_source_list_line_over_64_kib_fails_naming_the_list_and_line() {
    let env = Env::new("");
    env.data("a", b"a");
    let long = "x".repeat(70 << 10);
    env.data("list.txt", format!("a\n# fine\n{long}\na\n").as_bytes());
    let r = env.fails(
        "m.json",
        r#"{"output":"o","source_lists":["list.txt"]}"#,
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(m.contains("list.txt") && m.contains("line 3"), "{m}");
    assert!(m.contains("64 KiB"), "{m}");
    assert!(m.len() < 400, "the line is not echoed: {} bytes", m.len());
}

#[test]
fn a_sparse_list_of_gibibytes_without_a_newline_fails_fast() {
    let env = Env::new("");
    let list = env.data("huge.txt", b"");
    std::fs::File::options()
        .write(true)
        .open(&list)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let m = env.path("m.json");
    std::fs::write(&m, r#"{"output":"o","source_lists":["huge.txt"]}"#).unwrap();
    let (code, r, took) = once_path(&env, &m, Duration::from_secs(30));
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["error"]["kind"], "invalid_manifest", "{r:#}");
    let msg = message(&r);
    assert!(msg.contains("huge.txt") && msg.contains("line 1"), "{msg}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_json_list_element_over_64_kib_fails_naming_the_list_and_element() {
    let env = Env::new("");
    env.data("a", b"a");
    let long = "y".repeat(70 << 10);
    env.data("list.json", format!(r#"["a", "a", "{long}"]"#).as_bytes());
    let r = env.fails(
        "m.json",
        r#"{"output":"o","source_lists":["list.json"]}"#,
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(m.contains("list.json") && m.contains("element 3"), "{m}");
    assert!(
        m.len() < 400,
        "the element is not echoed: {} bytes",
        m.len()
    );
    // An object element too.
    let pad = "z".repeat(70 << 10);
    env.data(
        "obj.json",
        format!(r#"[{{"path":"a","blake3":"{pad}"}}]"#).as_bytes(),
    );
    let r = env.fails(
        "n.json",
        r#"{"output":"o","source_lists":["obj.json"]}"#,
        "invalid_manifest",
        "o",
    );
    assert!(message(&r).contains("element 1"), "{r:#}");
}

/// The documented limit of inline sources (README, manifest section).
const MAX_INLINE: usize = 100_000;

#[test]
fn more_inline_sources_than_the_limit_are_refused_pointing_at_source_lists() {
    let env = Env::new("");
    let many = vec!["\"a\""; MAX_INLINE + 1].join(",");
    let r = env.fails(
        "m.json",
        &format!(r#"{{"output":"o","sources":[{many}]}}"#),
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(m.contains("100000") && m.contains("source_lists"), "{m}");
    // COS's sourceList, and YAML.
    let cos = vec![r#"{"url":"https://h/x"}"#; MAX_INLINE + 1].join(",");
    let r = env.fails(
        "c.json",
        &format!(r#"{{"key":"o","sourceList":[{cos}]}}"#),
        "invalid_manifest",
        "o",
    );
    assert!(message(&r).contains("source_lists"), "{r:#}");
    let yaml = format!("output: o\nsources:\n{}", "  - a\n".repeat(MAX_INLINE + 1));
    let r = env.fails("y.yaml", &yaml, "invalid_manifest", "o");
    assert!(message(&r).contains("source_lists"), "{r:#}");
}

#[test]
fn errors_name_the_manifest_as_given_and_quote_only_a_short_excerpt() {
    let env = Env::new("");
    env.data("a", b"a");
    let key = format!("SECRETKEY{}", "k".repeat(500));
    let r = env.fails(
        "m.json",
        &format!(r#"{{"output":"o","sources":["a"],"{key}":1}}"#),
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(
        m.contains("SECRETKEY"),
        "the start of the key is named: {m}"
    );
    assert!(!m.contains(&"k".repeat(60)), "no long echo: {m}");
    let value = format!("line one\nline two {}", "v".repeat(500));
    let r = env.fails(
        "v.json",
        &serde_json::json!({"output": "o", "sources": ["a"], "overwrite": value}).to_string(),
        "invalid_manifest",
        "o",
    );
    let m = message(&r);
    assert!(!m.contains(&"v".repeat(60)) && !m.contains('\n'), "{m}");
    // YAML errors show no lines of the file.
    let yaml = format!(
        "output: o\nsources: [a]\nsecret_line_{}: 1\n",
        "s".repeat(300)
    );
    let r = env.fails("y.yaml", &yaml, "invalid_manifest", "o");
    let m = message(&r);
    assert!(!m.contains(&"s".repeat(60)) && !m.contains('\n'), "{m}");
    let r = env.fails(
        "z.yaml",
        "output: o\nsources: [a\n  ]]]: {{\n",
        "invalid_manifest",
        "o",
    );
    assert!(!message(&r).contains('\n'), "{r:#}");
    assert!(
        message(&r).contains(&env.path("z.yaml").display().to_string()),
        "{r:#}"
    );
}
