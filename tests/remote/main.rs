//! Remote sources end to end: the real `concatd once` binary against real servers on loopback.
//!
//! - HTTP: a small HTTP/1.1 server inside this test process (std threads) that can misbehave on
//!   purpose, chosen by the first path segment (`/ok/`, `/drop/`, `/flaky/`, …).
//! - S3 ([`s3`]): `moto_server` (PyPI `moto[server]`, installed by `.ci/run`) on 127.0.0.1,
//!   filled through its API with boto3.
//! - SSRF ([`ssrf`]): cases whose addresses are not loopback run inside a new network namespace
//!   (see [`ssrf::ssrf_cases_in_a_network_namespace`]), so no packet can leave the machine even if
//!   the code under test is wrong.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod newuser;
mod redact;
mod s3;
mod s3out;
mod server;
mod ssrf;

use server::Server;

// ---------------------------------------------------------------------------------------------
// Running `concatd once`

struct Job {
    dir: tempfile::TempDir,
}

impl Job {
    /// A rule allowing `urls`, with fast timeouts and 64 KiB chunks so small objects make many
    /// ranged requests.
    fn new(urls: &[String], extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "out", "src"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let urls = urls
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "log_dir: logs\nrules:\n  - name: r\n    watch: in\n    output_root: out\n    source_root: src\n    fsync: false\n    allow:\n      urls: [{urls}]\n    remote:\n      connect_timeout: 2s\n      idle_timeout: 400ms\n      attempts: 3\n      backoff: 10ms\n      parallel: 4\n      chunk_size: 64KiB\n{extra}"
        );
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        Job { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn manifest(&self, sources: Value) -> PathBuf {
        let m = serde_json::json!({"output": "merged.bin", "sources": sources});
        let path = self.path("in/m.json");
        std::fs::write(&path, m.to_string()).unwrap();
        path
    }

    fn command(&self, manifest: &Path) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("concatd"));
        c.arg("once")
            .arg("-c")
            .arg(self.path("rules.yaml"))
            .arg("--rule")
            .arg("r")
            .arg(manifest);
        c
    }

    fn run(&self, sources: Value) -> Value {
        let m = self.manifest(sources);
        let out = self.command(&m).output().unwrap();
        parse_result(&out.stdout, &out.stderr)
    }

    /// Run and expect failure of `kind`, with nothing published.
    fn fails(&self, sources: Value, kind: &str) -> String {
        let r = self.run(sources);
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["error"]["kind"], kind, "{r}");
        assert!(
            !self.path("out/merged.bin").exists(),
            "published on failure"
        );
        r["error"]["message"].as_str().unwrap().to_owned()
    }

    fn output(&self) -> Vec<u8> {
        std::fs::read(self.path("out/merged.bin")).unwrap()
    }
}

fn parse_result(stdout: &[u8], stderr: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "no result JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(stdout),
            String::from_utf8_lossy(stderr)
        )
    })
}

/// Deterministic test bytes.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn http_job(server: &Server) -> Job {
    let kinds = [
        "ok",
        "drop",
        "flaky",
        "always503",
        "change",
        "changequiet",
        "lie",
        "redir",
        "redirect-out",
        "slow",
        "forbidden",
        "nolen",
        "nohead",
    ];
    let urls: Vec<String> = kinds.iter().map(|k| server.url(&format!("{k}/"))).collect();
    Job::new(&urls, "")
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[test]
fn http_ranges_in_parallel_and_a_url_source_list() {
    let server = Server::start();
    let big = data(1_000_003, 1);
    server.put("big.bin", big.clone());
    server.put("small.bin", b"hello".to_vec());
    let list = serde_json::json!([server.url("ok/small.bin")]).to_string();
    server.put("list.json", list.into_bytes());
    let job = http_job(&server);
    let m = serde_json::json!({
        "output": "merged.bin",
        "sources": [server.url("ok/big.bin"), {"url": server.url("ok/big.bin"), "offset": 10, "length": 100, "blake3": b3(&big[10..110])}],
        "source_lists": [server.url("ok/list.json")],
    });
    let path = job.path("in/m.json");
    std::fs::write(&path, m.to_string()).unwrap();
    let out = job.command(&path).output().unwrap();
    let r = parse_result(&out.stdout, &out.stderr);
    assert_eq!(r["status"], "succeeded", "{r}");
    let mut want = big.clone();
    want.extend_from_slice(&big[10..110]);
    want.extend_from_slice(b"hello");
    assert_eq!(job.output(), want);
    assert_eq!(r["blake3"], b3(&want));
    // 1 MB in 64 KiB pieces: many ranged GETs.
    let gets = server.store.hits.lock().unwrap()["GET /ok/big.bin"];
    assert!(gets >= 16, "only {gets} GETs");
}

#[test]
fn http_dropped_connection_resumes_from_the_last_byte() {
    let server = Server::start();
    let body = data(50_000, 2);
    server.put("d.bin", body.clone());
    let job = http_job(&server);
    let r = job.run(serde_json::json!([server.url("drop/d.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(job.output(), body);
    assert_eq!(server.store.hits.lock().unwrap()["GET /drop/d.bin"], 2);
}

#[test]
fn http_without_head_sizes_by_a_ranged_get() {
    let server = Server::start();
    server.put("h.bin", data(70_000, 15));
    let job = http_job(&server);
    let r = job.run(serde_json::json!([server.url("nohead/h.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(job.output(), data(70_000, 15));
}

#[test]
fn http_503_then_200_is_retried_after_the_pause_asked() {
    let server = Server::start();
    server.put("f.bin", data(1000, 3));
    let job = http_job(&server);
    let r = job.run(serde_json::json!([server.url("flaky/f.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    // Retry-After: 1 on the HEAD and on the GET was honoured.
    assert!(r["duration_ms"].as_u64().unwrap() >= 1900, "{r}");
    assert_eq!(job.output(), data(1000, 3));
}

#[test]
fn http_endless_503_fails_naming_url_and_status() {
    let server = Server::start();
    let job = http_job(&server);
    let msg = job.fails(
        serde_json::json!([server.url("always503/x.bin")]),
        "remote_failed",
    );
    assert!(
        msg.contains("503") && msg.contains("always503/x.bin"),
        "{msg}"
    );
    assert!(msg.contains("3 attempt"), "{msg}");
}

#[test]
fn http_object_replaced_between_ranges_is_source_changed() {
    let server = Server::start();
    server.put("c.bin", data(300_000, 4));
    let job = http_job(&server);
    job.fails(
        serde_json::json!([server.url("change/c.bin")]),
        "source_changed",
    );
    server.put("q.bin", data(300_000, 4));
    let msg = job.fails(
        serde_json::json!([server.url("changequiet/q.bin")]),
        "source_changed",
    );
    assert!(msg.contains("ETag"), "{msg}");
}

#[test]
fn http_sources_in_every_write_mode() {
    let server = Server::start();
    let body = data(300_001, 14);
    server.put("w.bin", body.clone());
    for mode in ["pwrite", "copy_file_range", "mmap"] {
        let job = Job::new(&[server.url("ok/")], &format!("    write_mode: {mode}\n"));
        std::fs::write(job.path("src/l.bin"), b"local").unwrap();
        let r = job.run(serde_json::json!(["l.bin", server.url("ok/w.bin")]));
        assert_eq!(r["status"], "succeeded", "{mode}: {r}");
        assert_eq!(&job.output()[..5], b"local");
        assert!(job.output()[5..] == body[..], "{mode}: bytes differ");
    }
}

#[test]
fn http_length_lie_is_remote_failed() {
    let server = Server::start();
    server.put("l.bin", data(10_000, 5));
    let job = http_job(&server);
    let msg = job.fails(
        serde_json::json!([server.url("lie/l.bin")]),
        "remote_failed",
    );
    assert!(msg.contains("Content-Length"), "{msg}");
}

#[test]
fn http_redirects_only_to_allowed_urls() {
    let server = Server::start();
    server.put("r.bin", data(5000, 6));
    let job = http_job(&server);
    let msg = job.fails(
        serde_json::json!([server.url("redirect-out/r.bin")]),
        "source_not_allowed",
    );
    assert!(msg.contains("redirect"), "{msg}");
    assert_eq!(
        server.store.hits.lock().unwrap().get("HEAD /secret/r.bin"),
        None
    );
    let r = job.run(serde_json::json!([server.url("redir/r.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(job.output(), data(5000, 6));
}

#[test]
fn http_stalled_transfer_times_out() {
    let server = Server::start();
    server.put("s.bin", data(20_000, 7));
    let job = http_job(&server);
    let started = Instant::now();
    let msg = job.fails(
        serde_json::json!([server.url("slow/s.bin")]),
        "remote_failed",
    );
    assert!(msg.contains("timed out"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn http_404_403_unknown_size_and_disallowed_urls() {
    let server = Server::start();
    server.put("n.bin", data(100, 8));
    let job = http_job(&server);
    let msg = job.fails(
        serde_json::json!([server.url("ok/missing.bin")]),
        "source_not_found",
    );
    assert!(msg.contains("404"), "{msg}");
    let msg = job.fails(
        serde_json::json!([server.url("forbidden/x")]),
        "remote_failed",
    );
    assert!(msg.contains("403 Forbidden"), "{msg}");
    let msg = job.fails(
        serde_json::json!([server.url("nolen/n.bin")]),
        "remote_failed",
    );
    assert!(msg.contains("Content-Length"), "{msg}");
    // Prefix tricks: a longer segment, a different port, `..` out of the allowed folder.
    for url in [
        server.url("ok-secret/n.bin"),
        format!("http://127.0.0.1:{}/ok/n.bin", server.port.wrapping_add(1)),
        server.url("ok/../secret/n.bin"),
        format!("http://127.0.0.1.evil.test:{}/ok/n.bin", server.port),
    ] {
        job.fails(serde_json::json!([url]), "source_not_allowed");
    }
    assert!(
        server
            .store
            .hits
            .lock()
            .unwrap()
            .keys()
            .all(|k| !k.contains("secret"))
    );
}

#[test]
fn https_to_a_plain_http_server_fails_the_handshake() {
    // Exercises the rustls path: no certificate, no TLS at all on the other side.
    let server = Server::start();
    server.put("t.bin", data(100, 16));
    let url = format!("https://127.0.0.1:{}/ok/t.bin", server.port);
    let job = Job::new(&[format!("https://127.0.0.1:{}/ok/", server.port)], "");
    let msg = job.fails(serde_json::json!([url]), "remote_failed");
    assert!(msg.contains(&url), "{msg}");
}

#[test]
fn http_checks_declared_size_and_blake3() {
    let server = Server::start();
    server.put("k.bin", data(4096, 9));
    let job = http_job(&server);
    job.fails(
        serde_json::json!([{"url": server.url("ok/k.bin"), "size": 4000}]),
        "size_mismatch",
    );
    job.fails(
        serde_json::json!([{"url": server.url("ok/k.bin"), "blake3": b3(b"other")}]),
        "checksum_mismatch",
    );
}

/// A test whose tool is missing: skipped (and said so) on a developer's machine, but a failure
/// under CI (`CI` set, as `.ci/run` is run), which installs everything: a silent skip there would
/// pass without testing anything.
fn skip_outside_ci(why: &str) {
    if in_ci() {
        panic!("{why}: CI is set, so this test may not be skipped");
    }
    println!("SKIPPED: {why}");
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[test]
fn remote_config_errors_name_the_key() {
    let job = Job::new(&[], "");
    let rules = std::fs::read_to_string(job.path("rules.yaml"))
        .unwrap()
        .replace("chunk_size: 64KiB", "chunk_size: 100KB\n      retries: 3");
    std::fs::write(job.path("rules.yaml"), rules).unwrap();
    let out = Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
        .arg("check")
        .arg("-c")
        .arg(job.path("rules.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.stderr.as_slice().read_to_string(&mut text).unwrap();
    assert!(text.contains("remote.chunk_size"), "{text}");
    assert!(text.contains("remote.retries"), "{text}");
}
