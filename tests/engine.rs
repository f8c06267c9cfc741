//! Black-box tests of the job engine through the real binary: `concatd once` and `concatd check`
//! on real folders. Every successful output is compared byte for byte with the concatenated
//! inputs and its BLAKE3 with `b3sum`; every failure must leave nothing at the output path and an
//! earlier file there untouched.

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

/// A rules file with one rule `t` over fresh folders: `in/`, `out/`, `data/` (source_root).
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(extra: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "out", "data", "outside"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let env = Env { dir };
        env.rules(extra);
        env
    }

    fn rules(&self, extra: &str) {
        let text = format!(
            "log_dir: logs\nrules:\n  - name: t\n    watch: in\n    output_root: out\n    source_root: data\n{extra}"
        );
        std::fs::write(self.path("rules.yaml"), text).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn data(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path("data").join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Run `concatd once` on a manifest with this text; exit code and result JSON.
    fn once(&self, name: &str, manifest: &str) -> (i32, Value) {
        let m = self.path(name);
        std::fs::write(&m, manifest).unwrap();
        let out = Command::cargo_bin("concatd")
            .unwrap()
            .args(["once", "-c"])
            .arg(self.path("rules.yaml"))
            .args(["--rule", "t"])
            .arg(&m)
            .output()
            .unwrap();
        let code = out.status.code().unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, json)
    }

    /// Run a manifest that must succeed, and check the output against `want`.
    fn succeeds(&self, manifest: &str, output: &str, want: &[u8]) -> Value {
        let (code, r) = self.once("m.json", manifest);
        assert_eq!(code, 0, "{r:#}");
        assert_eq!(r["status"], "succeeded");
        let out = self.path("out").join(output);
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == want,
            "output differs from the concatenated inputs ({} vs {} bytes)",
            got.len(),
            want.len()
        );
        let b3 = b3sum(&out);
        assert_eq!(r["blake3"], b3.as_str());
        assert_eq!(r["size"], want.len() as u64);
        // The sidecar is in b3sum format: b3sum -c accepts it.
        let check = Command::new("b3sum")
            .arg("-c")
            .arg(format!("{output}.b3").rsplit('/').next().unwrap())
            .current_dir(out.parent().unwrap())
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "b3sum -c: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        assert_no_temp_files(&self.path("out"));
        r
    }

    /// Run a manifest that must fail with `kind`; nothing may appear at `output`, and whatever
    /// was there before must be untouched.
    fn fails(&self, name: &str, manifest: &str, kind: &str, output: &str) -> Value {
        let out = self.path("out").join(output);
        let b3 = PathBuf::from(format!("{}.b3", out.display()));
        let before = std::fs::read(&out).ok();
        let b3_before = std::fs::read(&b3).ok();
        let (code, r) = self.once(name, manifest);
        assert_eq!(code, 1, "{r:#}");
        assert_eq!(r["status"], "failed");
        assert_eq!(r["error"]["kind"], kind, "{r:#}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(name),
            "the message names the manifest: {message}"
        );
        assert_eq!(std::fs::read(&out).ok(), before, "output path changed");
        assert_eq!(std::fs::read(&b3).ok(), b3_before, "sidecar path changed");
        assert_no_temp_files(&self.path("out"));
        r
    }
}

fn b3sum(path: &Path) -> String {
    let out = Command::new("b3sum")
        .arg("--no-names")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "b3sum is installed (.ci/run installs it)"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn assert_no_temp_files(dir: &Path) {
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".concatd-"),
            "temporary file left: {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// Deterministic pseudo-random bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn json(v: Value) -> String {
    v.to_string()
}

#[test]
fn empty_sources_mixed_in() {
    let env = Env::new("");
    let a = bytes(1, 3000);
    let b = bytes(2, 5);
    env.data("a", &a);
    env.data("empty", b"");
    env.data("b", &b);
    let m = json(
        serde_json::json!({"output": "x.bin", "sources": ["empty", "a", "empty", "b", "empty"]}),
    );
    env.succeeds(&m, "x.bin", &[a, b].concat());
}

#[test]
fn one_source_and_only_empty_sources() {
    let env = Env::new("");
    let a = bytes(3, 100_000);
    env.data("a", &a);
    env.succeeds(
        &json(serde_json::json!({"output": "one", "sources": ["a"]})),
        "one",
        &a,
    );
    env.data("e", b"");
    env.succeeds(
        &json(serde_json::json!({"output": "zero", "sources": ["e", "e"]})),
        "zero",
        b"",
    );
}

#[test]
fn ten_thousand_small_sources() {
    let env = Env::new("");
    let mut want = Vec::new();
    let mut names = Vec::new();
    for i in 0..10_000u64 {
        let b = bytes(i, (i as usize * 37) % 3000);
        env.data(&format!("d{}/f{i}", i % 10), &b);
        want.extend_from_slice(&b);
        names.push(format!("d{}/f{i}", i % 10));
    }
    let m = json(serde_json::json!({"output": "many/out.bin", "sources": names}));
    let r = env.succeeds(&m, "many/out.bin", &want);
    assert_eq!(r["sources"], 10_000);
}

#[test]
fn source_list_of_100000_lines() {
    let env = Env::new("");
    let files: Vec<Vec<u8>> = (0..100).map(|i| bytes(i, 50 + i as usize)).collect();
    for (i, b) in files.iter().enumerate() {
        env.data(&format!("p{i}"), b);
    }
    let mut list = String::from("# 100,000 parts\n");
    let mut want = Vec::new();
    for i in 0..100_000usize {
        list.push_str(&format!("p{}\n", i % 100));
        want.extend_from_slice(&files[i % 100]);
    }
    env.data("list.txt", list.as_bytes());
    // A JSON-array list follows the line list.
    env.data(
        "list.json",
        br#"["p1", {"path": "p2", "offset": 10, "length": 5}]"#,
    );
    want.extend_from_slice(&files[1]);
    want.extend_from_slice(&files[2][10..15]);
    let m = json(
        serde_json::json!({"output": "listed", "sources": ["p0"], "source_lists": ["list.txt", "list.json"]}),
    );
    let mut full = files[0].clone();
    full.extend_from_slice(&want);
    let r = env.succeeds(&m, "listed", &full);
    assert_eq!(r["sources"], 100_003);
}

#[test]
fn ranges_at_start_middle_and_end() {
    let env = Env::new("");
    let a = bytes(7, 10_000);
    env.data("a", &a);
    let m = json(serde_json::json!({"output": "r", "sources": [
        {"path": "a", "offset": 0, "length": 100},
        {"path": "a", "offset": 4000, "length": 1500},
        {"path": "a", "offset": 9000},
        {"path": "a", "offset": 10000},
        {"path": "a", "length": 1}
    ]}));
    let want = [&a[..100], &a[4000..5500], &a[9000..], &a[..1]].concat();
    env.succeeds(&m, "r", &want);
}

/// Outputs several pieces (4 MiB) and map windows long, with sources straddling the boundaries,
/// in every write mode, with per-source checksums and `expect` checked too.
#[test]
fn every_write_mode_across_window_boundaries() {
    for mode in ["pwrite", "copy_file_range", "mmap", "auto"] {
        let env = Env::new(&format!("    write_mode: {mode}\n    fsync: false\n"));
        let big = bytes(11, 9 * 1024 * 1024 + 333);
        let small = bytes(12, 4097);
        env.data("big", &big);
        env.data("small", &small);
        let want = [&small[..], &big[..], &small[..], &big[1..3 * 1024 * 1024]].concat();
        let m = json(serde_json::json!({
            "output": "w.bin",
            "sources": [
                {"path": "small", "size": 4097, "blake3": blake3::hash(&small).to_hex().as_str()},
                {"path": "big", "blake3": blake3::hash(&big).to_hex().as_str()},
                "small",
                {"path": "big", "offset": 1, "length": 3 * 1024 * 1024 - 1}
            ],
            "expect": {"size": want.len(), "blake3": blake3::hash(&want).to_hex().as_str()}
        }));
        let r = env.succeeds(&m, "w.bin", &want);
        assert_eq!(
            r["write_mode"],
            if mode == "auto" { "pwrite" } else { mode }
        );
    }
}

#[test]
fn yaml_manifest_and_cos_aliases() {
    let env = Env::new("");
    let a = bytes(5, 2000);
    env.data("a", &a);
    env.data("b", b"tail");
    let (code, r) = env.once(
        "m.yaml",
        "key: cos/out.bin\nbucket: examplebucket-1250000000\nregion: ap-guangzhou\nsourceList:\n  - path: a\n  - b\n",
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(
        std::fs::read(env.path("out/cos/out.bin")).unwrap(),
        [&a[..], b"tail"].concat()
    );
    let (code, r) = env.once(
        "m2.yaml",
        "output: y.bin\nsources:\n  - a\n  - path: b\n    size: 4\n",
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(
        std::fs::read(env.path("out/y.bin")).unwrap(),
        [&a[..], b"tail"].concat()
    );
}

#[test]
fn missing_source() {
    let env = Env::new("");
    env.data("a", b"a");
    let r = env.fails(
        "m.json",
        r#"{"output":"o","sources":["a","nope"]}"#,
        "source_not_found",
        "o",
    );
    assert_eq!(r["error"]["source_index"], 2);
    assert!(r["error"]["message"].as_str().unwrap().contains("nope"));
}

#[test]
fn source_outside_allow_paths_absolute_relative_and_symlinked() {
    let env = Env::new("");
    std::fs::write(env.path("outside/secret"), b"secret").unwrap();
    env.data("a", b"a");
    std::os::unix::fs::symlink(env.path("outside/secret"), env.path("data/link")).unwrap();
    let abs = env.path("outside/secret").display().to_string();
    for (i, src) in [abs.as_str(), "../outside/secret", "link", "/etc/hostname"]
        .iter()
        .enumerate()
    {
        let m = json(serde_json::json!({"output": "o", "sources": ["a", src]}));
        let r = env.fails(&format!("m{i}.json"), &m, "source_not_allowed", "o");
        assert_eq!(r["error"]["source_index"], 2);
    }
}

#[test]
fn output_leaving_output_root() {
    let env = Env::new("");
    env.data("a", b"a");
    let abs = env.path("outside/abs").display().to_string();
    for (i, out) in ["../escape", abs.as_str(), "sub/../../escape"]
        .iter()
        .enumerate()
    {
        let m = json(serde_json::json!({"output": out, "sources": ["a"]}));
        env.fails(&format!("m{i}.json"), &m, "output_not_allowed", "o");
    }
    assert!(!env.path("escape").exists());
    assert!(!env.path("outside/abs").exists());
}

#[test]
fn fifo_socket_and_directory_sources_do_not_block() {
    let env = Env::new("");
    env.data("a", b"a");
    let fifo = env.path("data/fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let _sock = std::os::unix::net::UnixListener::bind(env.path("data/sock")).unwrap();
    std::fs::create_dir(env.path("data/dir")).unwrap();
    for (i, src) in ["fifo", "sock", "dir", "/dev/zero"].iter().enumerate() {
        let extra = if *src == "/dev/zero" {
            "    allow:\n      paths: [data, /dev]\n"
        } else {
            ""
        };
        env.rules(extra);
        let m = json(serde_json::json!({"output": "o", "sources": ["a", src]}));
        env.fails(&format!("m{i}.json"), &m, "source_not_regular", "o");
    }
}

#[test]
fn checksum_and_size_mismatches() {
    let env = Env::new("");
    let a = bytes(9, 5000);
    env.data("a", &a);
    let wrong = blake3::hash(b"other").to_hex().to_string();
    let cases = [
        (
            serde_json::json!({"output": "o", "sources": [{"path": "a", "blake3": wrong}]}),
            "checksum_mismatch",
        ),
        (
            serde_json::json!({"output": "o", "sources": ["a"], "expect": {"blake3": wrong}}),
            "checksum_mismatch",
        ),
        (
            serde_json::json!({"output": "o", "sources": [{"path": "a", "size": 4999}]}),
            "size_mismatch",
        ),
        (
            serde_json::json!({"output": "o", "sources": ["a"], "expect": {"size": 1}}),
            "size_mismatch",
        ),
        (
            serde_json::json!({"output": "o", "sources": [{"path": "a", "offset": 4000, "length": 1001}]}),
            "size_mismatch",
        ),
        (
            serde_json::json!({"output": "o", "sources": [{"path": "a", "offset": 5001}]}),
            "size_mismatch",
        ),
    ];
    for (i, (m, kind)) in cases.iter().enumerate() {
        env.fails(&format!("m{i}.json"), &json(m.clone()), kind, "o");
    }
}

#[test]
fn existing_output_is_never_clobbered() {
    let env = Env::new("");
    env.data("a", b"new bytes");
    std::fs::write(env.path("out/o"), b"earlier file").unwrap();
    env.fails(
        "m.json",
        r#"{"output":"o","sources":["a"]}"#,
        "output_exists",
        "o",
    );
    assert_eq!(std::fs::read(env.path("out/o")).unwrap(), b"earlier file");
    // The sidecar's name is taken too: by an earlier output called `p.b3`, say.
    std::fs::write(env.path("out/p.b3"), b"earlier p.b3").unwrap();
    let r = env.fails(
        "m2.json",
        r#"{"output":"p","sources":["a"]}"#,
        "output_exists",
        "p",
    );
    assert!(
        r["error"]["message"].as_str().unwrap().contains("p.b3"),
        "{r:#}"
    );
    assert_eq!(
        std::fs::read(env.path("out/p.b3")).unwrap(),
        b"earlier p.b3"
    );
    // With overwrite, it is replaced (atomically).
    env.succeeds(
        r#"{"output":"o","sources":["a"],"overwrite":true}"#,
        "o",
        b"new bytes",
    );
}

#[test]
fn too_large_before_any_byte_is_written() {
    let env = Env::new("    max_output_size: 10KiB\n");
    env.data("a", &bytes(1, 6000));
    let r = env.fails(
        "m.json",
        r#"{"output":"o","sources":["a","a"]}"#,
        "too_large",
        "o",
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_output_size")
    );
}

#[test]
fn malformed_and_empty_manifests() {
    let env = Env::new("");
    env.data("a", b"a");
    let cases = [
        ("m1.json", r#"{"output":"o","sources":["a"]"#),
        ("m2.yaml", "output: o\nsources: [a\n"),
        ("m3.json", r#"{"output":"o","sources":[]}"#),
        (
            "m4.json",
            r#"{"output":"o","sources":["a"],"colour":"red"}"#,
        ),
        ("m5.yaml", "output: o\noutput: p\nsources: [a]\n"),
        ("m6.json", r#"{"sources":["a"]}"#),
    ];
    for (name, text) in cases {
        env.fails(name, text, "invalid_manifest", "o");
    }
    env.data("empty.txt", b"\n\n");
    env.fails(
        "m7.json",
        r#"{"output":"o","source_lists":["empty.txt"]}"#,
        "invalid_manifest",
        "o",
    );
}

#[test]
fn manifest_over_64_mib_is_refused() {
    let env = Env::new("");
    let (code, r) = env.once("big.json", &" ".repeat(65 << 20));
    assert_eq!(code, 1);
    assert_eq!(r["error"]["kind"], "invalid_manifest");
    assert!(r["error"]["message"].as_str().unwrap().contains("64 MiB"));
}

/// A real full disk: an 8 MiB tmpfs as output_root. The job must fail with `no_space` before
/// writing (fallocate), leave nothing behind, and the filesystem must be empty again.
#[test]
fn full_disk_is_no_space() {
    let env = Env::new("");
    let mnt = env.path("out");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        // CI runs as root and must run this test; elsewhere it is skipped, loudly.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    env.data("a", &bytes(3, 6 << 20));
    for mode in ["pwrite", "mmap", "copy_file_range"] {
        env.rules(&format!("    write_mode: {mode}\n"));
        let r = env.fails(
            "m.json",
            r#"{"output":"o","sources":["a","a"]}"#,
            "no_space",
            "o",
        );
        assert!(r["error"]["message"].as_str().unwrap().contains("no space"));
    }
    // The same job fits when it is small enough: the disk was left clean.
    env.succeeds(r#"{"output":"o","sources":["a"]}"#, "o", &bytes(3, 6 << 20));
}

#[test]
fn check_reports_every_problem_with_rule_and_key() {
    let env = Env::new(
        "    colour: red\n    max_output_size: huge\n  - name: t\n    watch: nowhere\n    output_root: out\n",
    );
    let out = Command::cargo_bin("concatd")
        .unwrap()
        .args(["check", "-c"])
        .arg(env.path("rules.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rule 't': key 'colour': unknown key"), "{err}");
    assert!(err.contains("rule 't': key 'max_output_size'"), "{err}");
    assert!(
        err.contains("rule 't': key 'name': duplicate rule name"),
        "{err}"
    );
    assert!(err.contains("rule 't': key 'watch'"), "{err}");
    env.rules("");
    let ok = Command::cargo_bin("concatd")
        .unwrap()
        .args(["check", "-c"])
        .arg(env.path("rules.yaml"))
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn once_with_unknown_rule_or_bad_config_exits_2() {
    let env = Env::new("");
    env.data("a", b"a");
    std::fs::write(env.path("m.json"), r#"{"output":"o","sources":["a"]}"#).unwrap();
    let once = |rule: &str| {
        Command::cargo_bin("concatd")
            .unwrap()
            .args(["once", "-c"])
            .arg(env.path("rules.yaml"))
            .args(["--rule", rule])
            .arg(env.path("m.json"))
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(once("nope"), Some(2));
    std::fs::write(env.path("rules.yaml"), "rules: [").unwrap();
    assert_eq!(once("t"), Some(2));
    assert!(!env.path("out/o").exists());
}

/// A source truncated by another process while the job runs: `source_changed`, never a crash,
/// nothing published. The truncation happens as soon as the temporary output appears (planning
/// done), while the job is still copying the 50,000 small parts listed before the big one.
#[test]
fn source_truncated_during_the_job_is_source_changed() {
    let env = Env::new("    write_mode: mmap\n");
    env.data("small", &bytes(1, 100));
    env.data("big", &bytes(2, 8 << 20));
    env.data("list.txt", "small\n".repeat(50_000).as_bytes());
    let m = env.path("m.json");
    std::fs::write(
        &m,
        r#"{"output":"o","source_lists":["list.txt", "big.txt"]}"#,
    )
    .unwrap();
    env.data("big.txt", b"big\n");
    let child = Command::cargo_bin("concatd")
        .unwrap()
        .args(["once", "-c"])
        .arg(env.path("rules.yaml"))
        .args(["--rule", "t"])
        .arg(&m)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    'wait: while started.elapsed() < std::time::Duration::from_secs(60) {
        for e in std::fs::read_dir(env.path("out")).unwrap() {
            if e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".concatd-")
            {
                break 'wait;
            }
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.path("data/big"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{r:#}");
    assert_eq!(r["error"]["kind"], "source_changed", "{r:#}");
    assert_eq!(r["error"]["source_index"], 50_001);
    assert!(!env.path("out/o").exists());
    assert_no_temp_files(&env.path("out"));
}
