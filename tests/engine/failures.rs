//! Every error kind the engine can produce: each leaves nothing at the output path, an earlier
//! file there untouched, and no temporary file.

use std::path::PathBuf;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

use super::{Env, assert_no_temp_files, bytes, json};

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
    // The same job fits when it is small enough: the disk was left clean. The sources lie on
    // another filesystem, where the kernel cannot copy to the output (`EXDEV`): `auto` and
    // `copy_file_range` copy through the buffer instead.
    for mode in ["auto", "copy_file_range", "pwrite"] {
        env.rules(&format!("    write_mode: {mode}\n"));
        let r = env.succeeds(r#"{"output":"o","sources":["a"]}"#, "o", &bytes(3, 6 << 20));
        assert_eq!(r["size"], 6 << 20, "{mode}: {r:#}");
        std::fs::remove_file(mnt.join("o")).unwrap();
        let _ = std::fs::remove_file(mnt.join("o.b3"));
    }
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
    let child = once_until_copying(&env, &m);
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

/// Regression: with `overwrite`, a failure after the output was renamed into place (here the
/// sidecar cannot be published: a folder holds its name) must put the earlier file back.
#[test]
fn overwrite_that_fails_late_restores_the_earlier_file() {
    let env = Env::new("    overwrite: true\n");
    env.data("a", b"new bytes");
    std::fs::write(env.path("out/x.bin"), b"OLD").unwrap();
    std::fs::create_dir(env.path("out/x.bin.b3")).unwrap();
    env.fails(
        "m.json",
        r#"{"output":"x.bin","sources":["a"]}"#,
        "internal",
        "x.bin",
    );
    assert_eq!(std::fs::read(env.path("out/x.bin")).unwrap(), b"OLD");
    assert!(env.path("out/x.bin.b3").is_dir());
    // And with nothing there before, the failed job leaves nothing.
    std::fs::create_dir(env.path("out/y.bin.b3")).unwrap();
    env.fails(
        "m2.json",
        r#"{"output":"y.bin","sources":["a"]}"#,
        "internal",
        "y.bin",
    );
    assert!(!env.path("out/y.bin").exists());
}

/// Ctrl-C / SIGTERM during `once` cancels the job: a failed result, exit 1, and the fully
/// allocated temporary file removed (it used to stay behind, as large as the output).
#[test]
fn once_interrupted_by_sigterm_removes_its_temporary_file() {
    let env = Env::new("");
    env.data("small", &bytes(1, 100));
    env.data("big", &bytes(2, 8 << 20));
    env.data("list.txt", "small\n".repeat(200_000).as_bytes());
    env.data("big.txt", b"big\n");
    let m = env.path("m.json");
    std::fs::write(
        &m,
        r#"{"output":"o","source_lists":["list.txt", "big.txt"]}"#,
    )
    .unwrap();
    let child = once_until_copying(&env, &m);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{r:#}");
    assert_eq!(r["error"]["kind"], "cancelled", "{r:#}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{r:#}"
    );
    assert!(!env.path("out/o").exists());
    assert_no_temp_files(&env.path("out"));
}

/// Start `concatd once` on the manifest `m` and return once its planning is done: the moment its
/// temporary output appears, while it is still copying.
fn once_until_copying(env: &Env, m: &std::path::Path) -> std::process::Child {
    let child = Command::cargo_bin("concatd")
        .unwrap()
        .args(["once", "-c"])
        .arg(env.path("rules.yaml"))
        .args(["--rule", "t"])
        .arg(m)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(60) {
        let copying = std::fs::read_dir(env.path("out")).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".concatd-")
        });
        if copying {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child
}
