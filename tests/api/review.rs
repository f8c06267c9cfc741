//! Adversarial review of the API: each test here attacks one promise (auth that cannot be made
//! ambiguous, bodies held once, errors in the API's own shape, one job per answered POST).

use std::time::Duration;

use serde_json::{Value, json};

use super::api_support::*;
use super::support::*;

/// The daemon's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn more_than_one_authorization_header_is_refused_whatever_their_order() {
    let mut api = ApiEnv::new("", "");
    api.start();
    let good = format!("Bearer {}", api.token(&["r1"]));
    let bad = "Bearer NOTATOKEN";
    let one = tcp(
        &api.addr,
        "GET",
        "/v1/rules",
        &[("Authorization", &good)],
        b"",
    );
    assert_eq!(one.status, 200, "{}", one.text());
    // A gateway and the daemon must not read different credentials from one request: two
    // headers are refused, not judged by whichever comes first.
    for pair in [
        [good.as_str(), bad],
        [bad, good.as_str()],
        [good.as_str(), good.as_str()],
    ] {
        let headers = [("Authorization", pair[0]), ("Authorization", pair[1])];
        let r = tcp(&api.addr, "GET", "/v1/rules", &headers, b"");
        assert_eq!(r.status, 401, "{pair:?}: {}", r.text());
        assert_eq!(r.json()["error"]["status"], 401);
    }
    assert!(!api.daemon.as_ref().unwrap().log().contains(&good[7..]));
}

#[test]
fn bad_query_values_answer_400_in_the_api_error_shape() {
    let mut api = ApiEnv::new("", "");
    api.start();
    for path in [
        "/v1/rules/r1/logs?n=-1",
        "/v1/rules/r1/logs?n=99999999999999999999999",
        "/v1/rules/r1/logs?n=1&n=2",
    ] {
        let r = api.unix("GET", path, b"");
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["status"], 400, "{path}");
    }
    let body = json!({"output": "q.bin", "sources": []}).to_string();
    for path in [
        "/v1/rules/r1/jobs?wait=1s&wait=2s",
        "/v1/rules/r1/jobs?wait=-1",
        "/v1/rules/r1/jobs?wait=1e99",
    ] {
        let r = api.unix("POST", path, body.as_bytes());
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["status"], 400, "{path}");
    }
    // Nothing was dropped for the refused calls.
    let dropped: Vec<String> = names(&api.env.path("in"))
        .into_iter()
        .filter(|n| n.starts_with("api-"))
        .collect();
    assert!(dropped.is_empty(), "{dropped:?}");
}

/// A guard, not a fix: the body is gathered once (axum's `to_bytes` frees each frame as it joins
/// them; measured 41 MiB for 40 MiB before and after this review). Measured where only the API
/// holds the body: the rule's folder is a tmpfs too small for it,
/// so the drop fails (`507`) and no job reads it. Needs root: skipped without, failed under CI.
#[test]
fn a_large_body_is_held_in_memory_once() {
    let mut api = ApiEnv::new("", "");
    let small = api.env.path("in");
    let Some(_guard) = Tmpfs::mount_or_skip(&small, "1m") else {
        return;
    };
    // The fixture's 4 KiB limit raised to the spec's default, 64 MiB.
    let rules = std::fs::read_to_string(api.env.rules()).unwrap();
    api.env
        .write_rules(&rules.replace("max_body: 4KiB", "max_body: 64MiB\n  body_timeout: 2m"));
    api.start();
    let pid = api.daemon.as_ref().unwrap().child.id();
    let size = 40usize << 20;
    let body = vec![b'x'; size];
    let mut worst = 0;
    // Twice: the allocator's state after the first call is the common one.
    for _ in 0..2 {
        let before = peak_rss(pid);
        let r = api.unix("POST", "/v1/rules/r1/jobs", &body);
        assert_eq!(r.status, 507, "{}", r.text());
        worst = worst.max(peak_rss(pid).saturating_sub(before));
    }
    eprintln!(
        "peak RSS grew by {} MiB for a {} MiB body",
        worst >> 20,
        size >> 20
    );
    assert!(
        worst < size as u64 * 3 / 2,
        "peak RSS grew by {} MiB for a {} MiB body: it is held more than once",
        worst >> 20,
        size >> 20
    );
    api.daemon.take().unwrap().stop();
}

#[test]
fn sixteen_sync_calls_at_once_each_get_their_own_result() {
    let mut api = ApiEnv::new("  max_connections: 4\n", "");
    api.env.data("a", b"abc");
    api.start();
    let api = &api;
    let answers: Vec<(usize, Resp)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..16)
            .map(|i| {
                s.spawn(move || {
                    let body = json!({"output": format!("p{i}.bin"), "sources": ["a"]});
                    let r = api.unix(
                        "POST",
                        "/v1/rules/r1/jobs?wait=true",
                        body.to_string().as_bytes(),
                    );
                    (i, r)
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut ids = std::collections::HashSet::new();
    for (i, r) in answers {
        assert_eq!(r.status, 200, "{i}: {}", r.text());
        let v = r.json();
        assert!(
            v["output"]
                .as_str()
                .unwrap()
                .ends_with(&format!("p{i}.bin")),
            "{i}: {v}"
        );
        let id = v["job_id"].as_str().unwrap().to_owned();
        let filed: Vec<Value> = results(&api.env.path("in"))
            .into_iter()
            .filter(|r| r["job_id"] == id.as_str())
            .collect();
        assert_eq!(filed.len(), 1, "{id}");
        assert!(ids.insert(id));
    }
}

#[test]
fn a_post_answered_202_runs_once_after_kill_9() {
    let mut api = ApiEnv::new("", "");
    api.env.data("a", b"abc");
    api.start();
    let body = json!({"output": "k.bin", "sources": ["a"]}).to_string();
    let r = api.unix("POST", "/v1/rules/r1/jobs", body.as_bytes());
    api.daemon.take().unwrap().kill9();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    api.start();
    let job = poll_job(&api, &id);
    assert_eq!(job["result"]["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["job_id"], id.as_str());
    // Exactly one result, under the id answered.
    wait_until(Duration::from_secs(5), || {
        count_results(&api.env.path("in")) >= 1
    });
    let all = results(&api.env.path("in"));
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["job_id"], id.as_str());
    assert_eq!(std::fs::read(api.env.path("out/k.bin")).unwrap(), b"abc");
}

#[test]
fn a_tokens_file_open_to_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let mut api = ApiEnv::new("", "");
    let token = api.token(&["r1"]);
    let file = api.env.path("tokens");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    api.start();
    let d = api.daemon.as_ref().unwrap();
    let warned = |what: &str| {
        d.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("tokens file is") && l.contains(what))
    };
    assert!(warned("readable by group or others"), "{}", d.log());
    assert!(!warned("writable"), "{}", d.log());
    // Made group-writable while serving: said when the changed file is read again.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let r = api.tcp("GET", "/v1/rules", Some(&token), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(Duration::from_secs(5), || {
        warned("writable by group or others")
    });
    assert!(!d.log().contains(&token), "the token is logged");
}

#[test]
fn max_body_above_the_manifest_limit_still_refuses_what_no_job_could_read() {
    let mut api = ApiEnv::new("", "");
    let rules = std::fs::read_to_string(api.env.rules()).unwrap();
    api.env
        .write_rules(&rules.replace("max_body: 4KiB", "max_body: 128MiB\n  body_timeout: 2m"));
    api.start();
    // One byte over the largest manifest a job reads (64 MiB): 413 at once, nothing dropped.
    let body = vec![b' '; (64 << 20) + 1];
    let r = api.unix("POST", "/v1/rules/r1/jobs", &body);
    assert_eq!(r.status, 413, "{}", r.text());
    let dropped: Vec<String> = names(&api.env.path("in"))
        .into_iter()
        .filter(|n| n.starts_with("api-"))
        .collect();
    assert!(dropped.is_empty(), "{dropped:?}");
    assert_eq!(count_results(&api.env.path("in")), 0);
}
