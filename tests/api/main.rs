//! The API end to end: the real daemon serving its API on a Unix socket and on a loopback port,
//! called with a small raw HTTP client (tests/support/api.rs) and through
//! `concatd submit --api`.

#[path = "../support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "../support/api.rs"]
mod api_support;

#[path = "../remote/server.rs"]
#[allow(dead_code)]
mod server;

mod review;

use std::io::Write;
use std::time::{Duration, Instant};

use api_support::*;
use serde_json::{Value, json};
use support::*;

fn manifest(output: &str, sources: Value) -> Vec<u8> {
    json!({"output": output, "sources": sources})
        .to_string()
        .into_bytes()
}

/// The names in `dir` but the daemon's hidden `.work`.
fn visible(dir: &std::path::Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// The filed result of job `id` in `watch` (done/ or failed/).
fn filed_result(watch: &std::path::Path, id: &str) -> Value {
    results(watch)
        .into_iter()
        .find(|r| r["job_id"] == id)
        .unwrap_or_else(|| panic!("no filed result of {id}"))
}

#[test]
fn sync_and_async_jobs_over_the_socket_and_tcp() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"hello ");
    api.env.data("b", b"world");
    api.start();
    let r1 = api.token(&["r1"]);

    // Health needs no token.
    let h = api.tcp("GET", "/healthz", None, b"");
    assert_eq!((h.status, h.text().trim()), (200, "ok"));

    // Sync over the socket: the result, and the job id of the filed result.
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &manifest("s.bin", json!(["a", "b"])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let res = r.json();
    assert_eq!(res["status"], "succeeded");
    assert_eq!(res["size"], 11);
    assert_eq!(
        std::fs::read(api.env.path("out/s.bin")).unwrap(),
        b"hello world"
    );
    let id = res["job_id"].as_str().unwrap();
    assert_eq!(filed_result(&api.env.path("in"), id), res);

    // Async over TCP: 202, Location, then poll to the result.
    let r = api.tcp(
        "POST",
        "/v1/rules/r1/jobs",
        Some(&r1),
        &manifest("a.bin", json!(["b"])),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["state"], "waiting");
    let id = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    let job = poll_job(&api, &id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["rule"], "r1");
    assert_eq!(job["result"]["job_id"], id.as_str());
    assert_eq!(std::fs::read(api.env.path("out/a.bin")).unwrap(), b"world");
    let t = api.tcp("GET", &format!("/v1/jobs/{id}"), Some(&r1), b"");
    assert_eq!(t.json()["state"], "succeeded");

    // Unknown job and unknown rule: 404.
    let unknown = "0".repeat(32);
    assert_eq!(
        api.unix("GET", &format!("/v1/jobs/{unknown}"), b"").status,
        404
    );
    assert_eq!(api.unix("GET", "/v1/jobs/..%2f..%2fetc", b"").status, 404);
    let r = api.tcp(
        "POST",
        "/v1/rules/nope/jobs",
        Some(&r1),
        &manifest("x", json!(["a"])),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // A known path with another method: 405, refused as JSON like the rest.
    let r = api.unix("GET", "/v1/rules/r1/jobs", b"");
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.json()["error"]["status"], 405, "{}", r.text());

    // The rules document, and the log's last lines.
    let rules = api.unix("GET", "/v1/rules", b"").json();
    let listed: Vec<&str> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["r1", "r2"]);
    assert_eq!(rules["rules"][0]["done"], 2);
    assert!(rules["rules"][0]["daemon"]["pid"].is_number());
    // A token for r1 sees r1 only.
    let mine = api.tcp("GET", "/v1/rules", Some(&r1), b"").json();
    assert_eq!(mine["rules"].as_array().unwrap().len(), 1);
    let logs = api.tcp("GET", "/v1/rules/r1/logs?n=3", Some(&r1), b"");
    assert_eq!(logs.status, 200);
    assert!(
        logs.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(logs.text().lines().count(), 3, "{}", logs.text());
    assert!(logs.text().contains(&id), "{}", logs.text());
    assert_eq!(
        api.tcp("GET", "/v1/rules/nope/logs", Some(&r1), b"").status,
        404
    );

    // The manifests went through the folder: filed in done/ under their API names.
    let done = names(&api.env.path("in/done"));
    assert!(
        done.iter().any(|n| n == &format!("api-{id}.json")),
        "{done:?}"
    );
    assert_eq!(api.daemon.take().unwrap().stop(), 0);
    assert!(!api.socket.exists(), "the socket is removed on stop");
}

#[test]
fn sync_failures_answer_the_status_of_their_kind() {
    // A port nobody listens on: bound, then released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://127.0.0.1:{}/", dead.local_addr().unwrap().port());
    drop(dead);
    let mut api = ApiEnv::new(
        "",
        &format!(
            "    allow:\n      paths: [data]\n      urls: [\"{dead_url}\"]\n    remote:\n      \
             attempts: 1\n      connect_timeout: 2s\n"
        ),
    );
    api.env.data("a", b"abc");
    std::fs::write(api.env.path("out/taken.bin"), b"old").unwrap();
    api.start();
    let cases = [
        (manifest("taken.bin", json!(["a"])), 409, "output_exists"),
        (
            br#"{"output":"x.bin","sources":["a"],"bogus":1}"#.to_vec(),
            422,
            "invalid_manifest",
        ),
        (b"not json at all".to_vec(), 422, "invalid_manifest"),
        (
            manifest("y.bin", json!(["missing"])),
            422,
            "source_not_found",
        ),
        (
            manifest("../up.bin", json!(["a"])),
            422,
            "output_not_allowed",
        ),
        (
            manifest("z.bin", json!([{"path": "a", "size": 7}])),
            422,
            "size_mismatch",
        ),
        (
            json!({"output": "c.bin", "sources": ["a"], "expect": {"blake3": "0".repeat(64)}})
                .to_string()
                .into_bytes(),
            422,
            "checksum_mismatch",
        ),
        (
            manifest("r.bin", json!([format!("{dead_url}gone.bin")])),
            502,
            "remote_failed",
        ),
    ];
    for (body, code, kind) in cases {
        let r = api.unix("POST", "/v1/rules/r1/jobs?wait=30s", &body);
        assert_eq!(r.status, code, "{kind}: {}", r.text());
        let res = r.json();
        assert_eq!(res["status"], "failed");
        assert_eq!(res["error"]["kind"], kind, "{res}");
        // The very result the folder holds.
        assert_eq!(
            filed_result(&api.env.path("in"), res["job_id"].as_str().unwrap()),
            res
        );
    }
    assert_eq!(
        std::fs::read(api.env.path("out/taken.bin")).unwrap(),
        b"old"
    );
}

/// `no_space` → 507: the output folder is a small tmpfs (needs root: skipped without, failed under CI).
#[test]
fn no_space_answers_507() {
    let mut api = ApiEnv::new("", "");
    let small = api.env.path("out");
    let Some(_guard) = Tmpfs::mount_or_skip(&small, "128k") else {
        return;
    };
    api.env.data("big", &vec![7u8; 1 << 20]);
    api.start();
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &manifest("big.bin", json!(["big"])),
    );
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.json()["error"]["kind"], "no_space");
    assert_eq!(
        names(&small),
        Vec::<String>::new(),
        "nothing left in the output folder"
    );
    api.daemon.take().unwrap().stop();
}

#[test]
fn tokens_decide_who_may_use_which_rule_and_are_never_logged() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    // Made before the start and after: the daemon rereads the tokens file when it changes.
    let r1 = api.token(&["r1"]);
    api.start();
    let r2 = api.token(&["r2"]);
    let all = {
        let out = api
            .env
            .concatd()
            .args(["token", "-c", "rules.yaml", "--all"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let tokens_file = std::fs::read_to_string(api.env.path("tokens")).unwrap();
    for t in [&r1, &r2, &all] {
        assert_eq!(t.len(), 64);
        assert!(!tokens_file.contains(t.as_str()), "a token is stored");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(api.env.path("tokens"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let body = manifest("t.bin", json!(["a"]));
    let post = |token: Option<&str>| api.tcp("POST", "/v1/rules/r1/jobs", token, &body).status;
    assert_eq!(post(None), 401);
    let bogus = "SECRETBOGUSTOKEN0123456789";
    assert_eq!(post(Some(bogus)), 401);
    // The hash of a real token is not a token.
    assert_eq!(
        post(Some(tokens_file.split_whitespace().next().unwrap())),
        401
    );
    assert_eq!(post(Some(&r2)), 403);
    assert_eq!(post(Some(&r1)), 202);
    assert_eq!(post(Some(&all)), 202);
    assert_eq!(
        api.tcp("GET", "/v1/rules/r1/logs", Some(&r2), b"").status,
        403
    );
    assert_eq!(api.tcp("GET", "/v1/rules", None, b"").status, 401);
    // A bad request still carrying a token: never logged either.
    let r = tcp(
        &api.addr,
        "POST",
        "/v1/rules/r1/jobs?wait=forever",
        &[("Authorization", &format!("Bearer {r1}"))],
        b"{}",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // `/metrics` needs no token.
    assert_eq!(api.tcp("GET", "/metrics", None, b"").status, 200);
    // An unknown rule for `concatd token`: exit 2 naming it, nothing appended.
    let out = api
        .env
        .concatd()
        .args([
            "token",
            "-c",
            "rules.yaml",
            "--rule",
            "r1",
            "--rule",
            "ghost",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'ghost'"));
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(api.env.path("tokens"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    wait_until(Duration::from_secs(10), || {
        count_results(&api.env.path("in")) == 2
    });
    let d = api.daemon.take().unwrap();
    let stderr = d.stderr.clone();
    assert_eq!(d.stop(), 0);
    let mut logs = std::fs::read_to_string(stderr).unwrap();
    for n in names(&api.env.path("logs")) {
        logs.push_str(&std::fs::read_to_string(api.env.path("logs").join(n)).unwrap());
    }
    assert!(logs.contains("api: manifest dropped"), "{logs}");
    for t in [r1.as_str(), &r2, &all, bogus] {
        assert!(!logs.contains(t), "token {t} logged:\n{logs}");
    }
}

#[test]
fn bodies_over_max_body_get_413_and_the_daemon_keeps_serving() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    api.start();
    let big = {
        let pad = "x".repeat(8 << 10);
        format!(r#"{{"output":"big.bin","sources":["a"],"pad":"{pad}"}}"#).into_bytes()
    };
    // Declared too large.
    let r = api.unix("POST", "/v1/rules/r1/jobs", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    // Chunked, no length declared: cut off while it is read.
    let mut s = std::os::unix::net::UnixStream::connect(&api.socket).unwrap();
    let mut req = head(
        "POST",
        "/v1/rules/r1/jobs",
        &[("Transfer-Encoding", "chunked")],
        None,
    )
    .into_bytes();
    for chunk in big.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let _ = s.write_all(&req);
    let r = read_answer(s);
    assert_eq!(r.status, 413, "{}", r.text());
    // Nothing was dropped, and the daemon still serves.
    assert_eq!(visible(&api.env.path("in")), ["done", "failed"]);
    assert_eq!(api.unix("GET", "/healthz", b"").status, 200);
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &manifest("ok.bin", json!(["a"])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn yaml_and_cos_bodies() {
    let server = server::Server::start();
    server.put("c.bin", b"cos-".to_vec());
    let mut api = ApiEnv::new(
        "",
        &format!(
            "    allow:\n      paths: [data]\n      urls: [\"{}\"]\n",
            server.url("")
        ),
    );
    api.env.data("a", b"abc");
    api.env.data("b", b"def");
    api.start();
    let r = unix(
        &api.socket,
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &[("Content-Type", "application/yaml")],
        b"output: y.bin\nsources: [b, a]\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["manifest"].as_str().unwrap().ends_with(".yaml"),
        "{}",
        r.text()
    );
    assert_eq!(std::fs::read(api.env.path("out/y.bin")).unwrap(), b"defabc");
    // The COS function's body as it is.
    let cos = json!({
        "bucket": "b-123", "region": "ap-x", "key": "cos.bin",
        "sourceList": [{"url": server.url("ok/c.bin")}, {"url": server.url("ok/c.bin")}]
    });
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        cos.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::read(api.env.path("out/cos.bin")).unwrap(),
        b"cos-cos-"
    );
    // YAML sent without its content type is read as JSON: invalid_manifest.
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        b"output: n.bin\nsources: [a]\n",
    );
    assert_eq!(r.status, 422, "{}", r.text());
}

/// A slow job: one HTTP source served a byte every 10 ms by the test's own server.
fn slow_env(bytes: usize, top: &str) -> (ApiEnv, server::Server, Vec<u8>) {
    let server = server::Server::start();
    server.put("t.bin", vec![b'z'; bytes]);
    let mut api = ApiEnv::new(
        "",
        &format!(
            "    allow:\n      paths: [data]\n      urls: [\"{}\"]\n    remote:\n      \
             idle_timeout: 5s\n      attempts: 1\n",
            server.url("")
        ),
    );
    if !top.is_empty() {
        let text = std::fs::read_to_string(api.env.rules()).unwrap();
        api.env
            .write_rules(&text.replacen("shutdown_grace: 10s\n", top, 1));
    }
    api.start();
    let body = manifest("slow.bin", json!([server.url("trickle/t.bin")]));
    (api, server, body)
}

#[test]
fn a_caller_that_hangs_up_does_not_cancel_its_job() {
    let (api, _server, body) = slow_env(100, "");
    let token = api.token(&["r1"]);
    let mut s = std::net::TcpStream::connect(&api.addr).unwrap();
    let auth = format!("Bearer {token}");
    let mut req = head(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &[("Authorization", &auth)],
        Some(body.len()),
    )
    .into_bytes();
    req.extend_from_slice(&body);
    s.write_all(&req).unwrap();
    let watch = api.env.path("in");
    wait_until(Duration::from_secs(10), || !job_dirs(&watch).is_empty());
    drop(s);
    wait_until(Duration::from_secs(20), || count_results(&watch) == 1);
    let r = &results(&watch)[0];
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(
        std::fs::read(api.env.path("out/slow.bin")).unwrap(),
        vec![b'z'; 100]
    );
    assert!(
        names(&watch.join("done"))
            .iter()
            .any(|n| n.starts_with("api-"))
    );
}

#[test]
fn sigterm_ends_the_daemon_promptly_with_a_caller_mid_wait() {
    let (mut api, _server, body) = slow_env(3000, "shutdown_grace: 1s\n");
    let socket = api.socket.clone();
    let caller = std::thread::spawn(move || {
        unix(&socket, "POST", "/v1/rules/r1/jobs?wait=true", &[], &body)
    });
    let watch = api.env.path("in");
    wait_until(Duration::from_secs(10), || !job_dirs(&watch).is_empty());
    let d = api.daemon.take().unwrap();
    let log = d.stderr.clone();
    let started = Instant::now();
    let code = d.stop();
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(code, 0, "{log}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let r = caller.join().unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    // Cancelled at shutdown: claimed, left for the next start, nothing filed or published.
    assert_eq!(job_dirs(&watch), [id]);
    assert_eq!(count_results(&watch), 0);
    assert!(!api.env.path("out/slow.bin").exists());
}

#[test]
fn socket_peers_with_a_uid_not_allowed_get_403() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    api.start();
    // The socket's folder reachable by uid 65534, which joins the socket's group (root) only:
    // the kernel lets it connect, the daemon's uid check must refuse it.
    use std::os::unix::fs::PermissionsExt;
    for p in [api.env.dir.path().to_owned(), api.env.path("api")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let m = api.env.path("m.json");
    std::fs::write(&m, manifest("n.bin", json!(["a"]))).unwrap();
    std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=0", "--clear-groups"])
        .arg(bin())
        .args(["submit", "--rule", "r1", "--wait", "--api"])
        .arg(format!("unix:{}", api.socket.display()))
        .arg(&m)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("403") && stderr.contains("uid 65534"),
        "{stderr}"
    );
    assert_eq!(
        visible(&api.env.path("in")),
        ["done", "failed"],
        "nothing dropped"
    );
}

#[test]
fn submit_api_over_both_transports_and_its_errors() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    api.start();
    let token = api.token(&["r1"]);
    let m = api.env.path("m.json");
    std::fs::write(&m, manifest("u.bin", json!(["a"]))).unwrap();
    let submit = |addr: &str, token: Option<&str>, extra: &[&str]| {
        let mut c = api.env.concatd();
        c.args(["submit", "--rule", "r1", "--api", addr])
            .args(extra)
            .arg(&m);
        c.env_remove("CONCATD_TOKEN");
        if let Some(t) = token {
            c.env("CONCATD_TOKEN", t);
        }
        c.output().unwrap()
    };
    let unix_addr = format!("unix:{}", api.socket.display());
    let http_addr = format!("http://{}", api.addr);
    let out = submit(&unix_addr, None, &["--wait"]);
    assert_exit(&out, 0);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "succeeded");
    // Again: the output exists now, a failed result and exit 1.
    let out = submit(&http_addr, Some(&token), &["--wait", "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["error"]["kind"], "output_exists");
    // Async: the job id, then it runs.
    std::fs::write(&m, manifest("v.bin", json!(["a"]))).unwrap();
    let out = submit(&http_addr, Some(&token), &[]);
    assert_eq!(out.status.code(), Some(0));
    let accepted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = poll_job(&api, accepted["job_id"].as_str().unwrap());
    assert_eq!(job["state"], "succeeded");
    // Errors: a wrong token, a rule the token does not name, no token, nobody listening.
    let out = submit(&http_addr, Some("wrong"), &["--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let r2 = api.token(&["r2"]);
    let out = submit(&http_addr, Some(&r2), &["--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    let out = submit(&http_addr, None, &["--wait"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONCATD_TOKEN"));
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let out = submit(&dead_addr, Some(&token), &["--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn metrics_count_the_jobs_run() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    api.start();
    for i in 0..3 {
        let r = api.unix(
            "POST",
            "/v1/rules/r1/jobs?wait=true",
            &manifest(&format!("m{i}.bin"), json!(["a"])),
        );
        assert_eq!(r.status, 200);
    }
    let r = api.unix(
        "POST",
        "/v1/rules/r1/jobs?wait=true",
        &manifest("bad.bin", json!(["nope"])),
    );
    assert_eq!(r.status, 422);
    // Counted right after a result is filed, which is when the waiting call may already have
    // answered: read until the count arrives (and check it does not overshoot).
    let mut text = String::new();
    let mut counts = (0.0, 0.0);
    let limit = Instant::now() + Duration::from_secs(5);
    while counts != (3.0, 1.0) && Instant::now() < limit {
        text = api.tcp("GET", "/metrics", None, b"").text();
        counts = jobs_total(&text, "r1");
    }
    assert_eq!(counts, (3.0, 1.0), "{text}");
    assert_eq!(jobs_total(&text, "r2"), (0.0, 0.0), "{text}");
}

/// `concatd_jobs_total` of `rule`: (succeeded, failed), parsed from Prometheus text.
fn jobs_total(text: &str, rule: &str) -> (f64, f64) {
    let (mut succeeded, mut failed) = (0.0, 0.0);
    for line in text
        .lines()
        .filter(|l| l.starts_with("concatd_jobs_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap();
        if !labels.contains(&format!("rule=\"{rule}\"")) {
            continue;
        }
        if labels.contains("status=\"succeeded\"") {
            succeeded += v;
        } else if labels.contains("status=\"failed\"") {
            failed += v;
        }
    }
    (succeeded, failed)
}

#[test]
fn slow_clients_time_out_connections_are_bounded_and_a_stale_socket_is_replaced() {
    let mut api = ApiEnv::new(
        "  header_timeout: 1s\n  body_timeout: 1s\n  max_connections: 1\n",
        "",
    );
    // A socket file left by a daemon killed with -9: nobody accepts on it.
    drop(std::os::unix::net::UnixListener::bind(&api.socket).unwrap());
    assert!(api.socket.exists());
    api.start();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&api.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // A body that stops halfway: 408 once body_timeout passes.
    let mut s = std::os::unix::net::UnixStream::connect(&api.socket).unwrap();
    s.write_all(head("POST", "/v1/rules/r1/jobs", &[], Some(100)).as_bytes())
        .unwrap();
    s.write_all(b"{\"output\":").unwrap();
    let r = read_answer(s);
    assert_eq!(r.status, 408, "{}", r.text());
    // Headers that never end hold the one connection slot only until header_timeout: the next
    // caller is served after it, not never.
    let mut idle = std::net::TcpStream::connect(&api.addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let r = api.tcp("GET", "/healthz", None, b"");
    let waited = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        waited >= Duration::from_millis(500),
        "served at once ({waited:?}): the connection bound did not hold"
    );
    // The slow client was hung up on.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut idle, &mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(api.daemon.take().unwrap().stop(), 0);
    assert!(!api.socket.exists());
}
