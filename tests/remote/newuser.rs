//! What a new user hits with remote sources (issue 8): servers that ignore Range, missing S3
//! credentials, Ctrl-C on `concatd once`, and one client per rule in the daemon.

use std::process::Child;

use super::*;

/// A job whose rule allows `urls`, with `remote:` settings `remote` (YAML lines, 6 spaces in).
fn job_with(urls: &[String], remote: &str, extra: &str) -> Job {
    let job = Job::new(urls, "");
    let urls = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let rules = format!(
        "log_dir: logs\nrules:\n  - name: r\n    watch: in\n    output_root: out\n    source_root: src\n    fsync: false\n    allow:\n      urls: [{urls}]\n    remote:\n{remote}{extra}"
    );
    std::fs::write(job.path("rules.yaml"), rules).unwrap();
    job
}

/// A free port on 127.0.0.1 (python's http.server cannot be given port 0 and report it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Python {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Python {
    /// `python3 -m http.server` serving `dir`, its request log in `log`.
    fn serve(dir: &Path, log: PathBuf) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "http.server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Python { child, port, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Requests of `method` for `path` in its log.
    fn count(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} /{path} ");
        std::fs::read_to_string(&self.log)
            .unwrap()
            .matches(&needle)
            .count()
    }
}

/// Item 1: python's http.server answers 200 with the whole body to a Range request. An object of
/// 20 MiB (more than the default 8 MiB chunk) is read whole and in part, byte-exact, in one GET
/// per source entry (plus at most one per other worker racing the first answer).
#[test]
fn python_http_server_without_range_support() {
    let served = tempfile::tempdir().unwrap();
    let body = data(20 << 20, 21);
    std::fs::write(served.path().join("big.bin"), &body).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let py = Python::serve(served.path(), logs.path().join("http.log"));
    let job = job_with(
        &[py.url("")],
        "      attempts: 3\n      backoff: 10ms\n      parallel: 4\n",
        "",
    );
    let (offset, length) = (9_000_001usize, 9_500_000usize);
    let m = job.manifest(serde_json::json!([
        py.url("big.bin"),
        {"url": py.url("big.bin"), "offset": offset, "length": length},
    ]));
    let out = job.command(&m).env("RUST_LOG", "info").output().unwrap();
    let r = parse_result(&out.stdout, &out.stderr);
    assert_eq!(r["status"], "succeeded", "{r}");
    let mut want = body.clone();
    want.extend_from_slice(&body[offset..offset + length]);
    assert!(job.output() == want, "output differs");
    assert_eq!(r["blake3"], b3(&want));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("the server ignores Range requests").count(),
        2,
        "once per source entry: {stderr}"
    );
    // 20 MiB in 8 MiB pieces is 3 + 2 pieces: a GET per piece would move 5 × 20 MiB. One
    // stream per entry (the first request of an object goes out alone): 2 GETs.
    let gets = py.count("GET", "big.bin");
    println!("python http.server: {gets} GETs for 2 entries of a 20 MiB object");
    assert_eq!(gets, 2, "{gets} GETs");
}

/// Item 1: a server without Range drops the connection half-way: the whole object is asked for
/// again (it cannot resume) and the bytes already copied are skipped; byte-exact.
#[test]
fn no_range_server_dropping_the_connection_is_retried_from_the_start() {
    let server = Server::start();
    let body = data(300_000, 22);
    server.put("d.bin", body.clone());
    let job = job_with(
        &[server.url("norangedrop/"), server.url("norange/")],
        "      attempts: 3\n      backoff: 10ms\n      parallel: 4\n      chunk_size: 64KiB\n      idle_timeout: 2s\n",
        "",
    );
    let r = job.run(serde_json::json!([server.url("norangedrop/d.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(job.output() == body, "output differs");
    // 300 kB in 64 KiB pieces, yet one stream: the GET that broke, and the one retried from
    // the start.
    assert_eq!(
        server.store.hits.lock().unwrap()["GET /norangedrop/d.bin"],
        2
    );
    // A part of the object, starting inside a piece: the bytes before it are skipped.
    std::fs::remove_file(job.path("out/merged.bin")).unwrap();
    std::fs::remove_file(job.path("out/merged.bin.b3")).unwrap();
    let r = job.run(serde_json::json!([
        {"url": server.url("norange/d.bin"), "offset": 100_000, "length": 150_000},
    ]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(job.output() == body[100_000..250_000], "output differs");
    assert_eq!(server.store.hits.lock().unwrap()["GET /norange/d.bin"], 1);
}

/// Item 4: missing S3 credentials fail at once, in one short line that says what was looked for.
#[test]
fn missing_s3_credentials_fail_at_once_in_one_line() {
    let Some(moto) = super::s3::start_moto() else {
        return skip_outside_ci(
            "moto_server is not installed (pip install 'moto[server]'; .ci/run does)",
        );
    };
    let home = tempfile::tempdir().unwrap();
    let s3 = format!(
        "    s3:\n      endpoint: {}\n      region: us-east-1\n      path_style: true\n",
        moto.endpoint
    );
    let job = job_with(
        &["s3://bkt/data/".to_owned()],
        "      attempts: 5\n      backoff: 200ms\n",
        &s3,
    );
    let m = job.manifest(serde_json::json!(["s3://bkt/data/x.bin"]));
    let started = Instant::now();
    let out = job
        .command(&m)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let took = started.elapsed();
    let r = parse_result(&out.stdout, &out.stderr);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error"]["kind"], "remote_failed", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    println!("{} bytes in {took:?}: {msg}", msg.len());
    assert!(!msg.contains('\n') && msg.len() < 300, "{msg}");
    for looked in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "~/.aws/credentials",
        "~/.aws/config",
    ] {
        assert!(msg.contains(looked), "{looked}: {msg}");
    }
    assert!(took < Duration::from_secs(2), "took {took:?}: retried?");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("retrying"), "{stderr}");
}

/// Item 6: SIGINT while `once` copies from a server that trickles bytes: exit 1 within 1 s, kind
/// `cancelled` with a message for a signal, no temporary file left.
#[test]
fn ctrl_c_on_once_cancels_within_a_second() {
    let server = Server::start();
    server.put("t.bin", data(100_000, 23));
    let job = job_with(
        &[server.url("trickle/")],
        "      attempts: 3\n      idle_timeout: 30s\n      parallel: 2\n      chunk_size: 64KiB\n",
        "",
    );
    let m = job.manifest(serde_json::json!([server.url("trickle/t.bin")]));
    let mut child = job
        .command(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Copying has begun once the server got a GET.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .store
        .hits
        .lock()
        .unwrap()
        .contains_key("GET /trickle/t.bin")
    {
        assert!(Instant::now() < deadline, "no GET arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100)); // let bytes flow
    let signalled = Instant::now();
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // Not a blocking wait: a job that ignores the signal would hold the test for the whole
    // trickle (1000 s).
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("still running 5 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = signalled.elapsed();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    println!("exit {status:?} {took:?} after SIGINT");
    assert_eq!(status.code(), Some(1));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["error"]["kind"], "cancelled", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("signal") && !msg.contains("daemon"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(job.path("out")).unwrap().collect();
    assert!(left.is_empty(), "left in out/: {left:?}");
}

/// Shape: one remote client per rule. Two remote jobs of one rule in the daemon: the client is
/// created once, by the first; a reload that changes the rule's remote settings makes a new one.
#[test]
fn two_jobs_of_a_rule_share_its_remote_client() {
    let server = Server::start();
    server.put("a.bin", data(70_000, 24));
    let job = job_with(
        &[server.url("ok/")],
        "      attempts: 3\n      chunk_size: 64KiB\n",
        "",
    );
    let stderr = job.path("daemon.stderr");
    let mut daemon = Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
        .args(["run", "-c"])
        .arg(job.path("rules.yaml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let wait = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !what() {
            assert!(Instant::now() < deadline, "timed out; log: {}", log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(&|| log().contains(" ready"));
    for (n, name) in ["one.json", "two.json"].iter().enumerate() {
        let m =
            serde_json::json!({"output": format!("o{n}.bin"), "sources": [server.url("ok/a.bin")]});
        let temp = job.path(&format!("in/.{name}.part"));
        std::fs::write(&temp, m.to_string()).unwrap();
        std::fs::rename(&temp, job.path("in").join(name)).unwrap();
        let out = job.path(&format!("out/o{n}.bin"));
        wait(&|| out.exists());
    }
    let created = |log: &str| log.matches("remote client created").count();
    assert_eq!(created(&log()), 1, "{}", log());
    // A reload that changes the rule's remote settings builds a new client for later jobs.
    let rules = std::fs::read_to_string(job.path("rules.yaml"))
        .unwrap()
        .replace("attempts: 3", "attempts: 4");
    let temp = job.path(".rules.yaml.tmp");
    std::fs::write(&temp, rules).unwrap();
    std::fs::rename(&temp, job.path("rules.yaml")).unwrap();
    wait(&|| log().contains("reloaded"));
    let m = serde_json::json!({"output": "o2.bin", "sources": [server.url("ok/a.bin")]});
    std::fs::write(job.path("in/.three.json.part"), m.to_string()).unwrap();
    std::fs::rename(job.path("in/.three.json.part"), job.path("in/three.json")).unwrap();
    wait(&|| job.path("out/o2.bin").exists());
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    let log = log();
    assert_eq!(log.matches("published").count(), 3, "{log}");
    assert_eq!(created(&log), 2, "{log}");
}

/// Item 1: without HEAD and without Range, the size comes from the 200's Content-Length.
#[test]
fn no_range_server_without_head_is_sized_by_its_whole_answer() {
    let server = Server::start();
    let body = data(200_000, 25);
    server.put("h.bin", body.clone());
    let job = job_with(
        &[server.url("norangenohead/")],
        "      attempts: 3\n      backoff: 10ms\n      parallel: 4\n      chunk_size: 64KiB\n",
        "",
    );
    let r = job.run(serde_json::json!([server.url("norangenohead/h.bin")]));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(job.output() == body, "output differs");
}
