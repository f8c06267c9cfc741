//! Black-box tests of the job engine through the real binary: `concatd once` and `concatd check`
//! on real folders. Every successful output is compared byte for byte with the concatenated
//! inputs and its BLAKE3 with `b3sum`; every failure must leave nothing at the output path and an
//! earlier file there untouched.

mod failures;
mod inputs;
mod newuser;
mod plan;
mod reflink;
mod review;
mod settle;
mod sources;
/// The daemon tests' helpers (a daemon as a child process, results, waits, a tmpfs).
#[allow(dead_code)]
#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

/// A rules file with one rule `t` over fresh folders: `in/`, `out/`, `data/` (source_root).
pub struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    pub fn new(extra: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "out", "data", "outside"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let env = Env { dir };
        env.rules(extra);
        env
    }

    pub fn rules(&self, extra: &str) {
        let text = format!(
            "log_dir: logs\nrules:\n  - name: t\n    watch: in\n    output_root: out\n    source_root: data\n{extra}"
        );
        std::fs::write(self.path("rules.yaml"), text).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn data(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path("data").join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Run `concatd once` on a manifest with this text; exit code and result JSON.
    pub fn once(&self, name: &str, manifest: &str) -> (i32, Value) {
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
    pub fn succeeds(&self, manifest: &str, output: &str, want: &[u8]) -> Value {
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
    pub fn fails(&self, name: &str, manifest: &str, kind: &str, output: &str) -> Value {
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

pub fn b3sum(path: &Path) -> String {
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

pub fn assert_no_temp_files(dir: &Path) {
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".concatd-"),
            "temporary file left: {}",
            entry.display()
        );
    }
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
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
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
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

pub fn json(v: Value) -> String {
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
            if mode == "auto" {
                "copy_file_range"
            } else {
                mode
            }
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
