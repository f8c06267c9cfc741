//! Credentials in URLs (userinfo, signed query strings) never reach a result, a log or stderr.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{Job, parse_result, server::Server};

const SECRETS: [&str; 5] = [
    "PWSECRET",
    "SIGSECRET",
    "CREDSECRET",
    "SIG2SECRET",
    "TOKSECRET",
];

fn no_secret(place: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} in {place}: {text}");
    }
}

/// Each case fails, and its message, the rule log and stderr name the host but no secret.
#[test]
fn url_credentials_are_redacted_in_results_logs_and_stderr() {
    let server = Server::start();
    let urls: Vec<String> = ["ok", "redirect-creds", "redirect-signed"]
        .iter()
        .map(|k| server.url(&format!("{k}/")))
        .collect();
    let job = Job::new(&urls, "");
    let cases = [
        // A redirect to a URL with userinfo and a signature: refused by the policy.
        (server.url("redirect-creds/a.bin"), "source_not_allowed"),
        // A redirect with signed query parameters, outside allow.urls.
        (server.url("redirect-signed/a.bin"), "source_not_allowed"),
        // Userinfo in the manifest's own URL.
        (
            format!("http://user:PWSECRET@127.0.0.1:{}/ok/a.bin", server.port),
            "source_not_allowed",
        ),
        // A presigned-looking URL that is not found.
        (
            server.url("ok/missing.bin?X-Amz-Signature=SIGSECRET&token=TOKSECRET&part=1"),
            "source_not_found",
        ),
    ];
    // `concatd once` (its stderr at info, so every line the job logs is printed there)…
    for (i, (url, kind)) in cases.iter().enumerate() {
        let m = job.path(&format!("m{i}.json"));
        let manifest = serde_json::json!({"output": "merged.bin", "sources": [url]});
        std::fs::write(&m, manifest.to_string()).unwrap();
        let out = job.command(&m).env("RUST_LOG", "info").output().unwrap();
        let r = parse_result(&out.stdout, &out.stderr);
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["error"]["kind"], *kind, "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains("127.0.0.1"), "names the host: {message}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("failed"),
            "stderr has the job's lines: {stderr}"
        );
        no_secret("the result", &String::from_utf8_lossy(&out.stdout));
        no_secret("stderr", &stderr);
        // …and the daemon, for the rule log and the result files.
        let tmp = job.path(&format!("in/.m{i}.json"));
        std::fs::write(&tmp, manifest.to_string()).unwrap();
        std::fs::rename(&tmp, job.path(&format!("in/m{i}.json"))).unwrap();
    }
    let stderr_path = job.path("daemon.stderr");
    let mut daemon = Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
        .arg("run")
        .arg("-c")
        .arg(job.path("rules.yaml"))
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let failed = job.path("in/failed");
    let start = Instant::now();
    let results = loop {
        let results: Vec<String> = std::fs::read_dir(&failed)
            .map(|d| {
                d.map(|e| e.unwrap().path())
                    .filter(|p| p.to_string_lossy().ends_with(".result.json"))
                    .map(|p| std::fs::read_to_string(p).unwrap())
                    .collect()
            })
            .unwrap_or_default();
        if results.len() == cases.len() {
            break results;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no results yet");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    daemon.wait().unwrap();
    for r in &results {
        no_secret("a result file", r);
    }
    let log = std::fs::read_to_string(job.path("logs/r.log")).unwrap();
    for i in 0..cases.len() {
        assert!(
            log.contains(&format!("m{i}.json")),
            "the rule log has job {i}: {log}"
        );
    }
    no_secret("the rule log", &log);
    no_secret(
        "the daemon's stderr",
        &std::fs::read_to_string(&stderr_path).unwrap(),
    );
    // The requests did carry the credentials: redaction is in what is printed, not what is sent.
    let hits = server.store.hits.lock().unwrap();
    assert!(
        hits.keys().any(|k| k.contains("SIGSECRET")),
        "the signed URL was requested as written: {hits:?}"
    );
}
