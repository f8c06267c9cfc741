//! Metrics fed by a real daemon: `concatd::daemon::run` in this process (the HTTP `/metrics`
//! belongs to the API's tests), real folders, real jobs, a real connection refused; the
//! registry read back through `concatd::metrics::render` and parsed.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::support::rule as rule_yaml;
use super::support::*;

fn samples() -> HashMap<String, f64> {
    concatd::metrics::render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn get(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("{series} missing from {s:#?}"))
}

#[test]
fn a_daemon_counts_its_jobs_bytes_retries_and_rescans() {
    // A rule name no other test of this binary uses: the registry is process-wide.
    let rule = "metrics_r";
    let env = Env::new("");
    // A loopback port with nothing listening: every request fails at once (connection refused).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    env.write_rules(&format!(
        "log_dir: logs\nshutdown_grace: 5s\nrules:\n{}",
        rule_yaml(
            rule,
            "in",
            &format!(
                "    fsync: false\n    allow:\n      urls: [\"http://127.0.0.1:{port}/\"]\n    remote:\n      attempts: 3\n      backoff: 1ms\n      connect_timeout: 1s\n"
            )
        )
    ));
    env.data("a", &[1u8; 1000]);
    env.data("b", &[2u8; 234]);

    // The daemon's per-rule log layer (it carries the rule a retry is counted for), without the
    // daemon's stderr output.
    let logs = concatd::logging::RuleLogs::default();
    {
        use tracing_subscriber::prelude::*;
        let layer = concatd::logging::SiftingLayer::new(logs.clone());
        let _ = tracing_subscriber::registry().with(layer).try_init();
    }
    let shutdown = CancellationToken::new();
    let (_reload_tx, reload) = tokio::sync::mpsc::unbounded_channel();
    let control = concatd::daemon::Control {
        shutdown: shutdown.clone(),
        reload,
    };
    let rules = env.rules();
    let daemon = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(concatd::daemon::run(&rules, logs, control))
    });

    // Every series of the rule is there, at 0, before any job (rescans: the arming one).
    let running = format!(r#"concatd_jobs_running{{rule="{rule}"}}"#);
    wait_until(Duration::from_secs(10), || samples().contains_key(&running));
    let s = samples();
    for name in [
        "concatd_bytes_written_total",
        "concatd_copied_bytes_total",
        "concatd_queue_depth",
        "concatd_jobs_running",
        "concatd_remote_retries_total",
        "concatd_job_duration_seconds_count",
    ] {
        assert_eq!(
            get(&s, &format!(r#"{name}{{rule="{rule}"}}"#)),
            0.0,
            "{name}"
        );
    }
    for status in ["succeeded", "failed"] {
        let series = format!(r#"concatd_jobs_total{{rule="{rule}",status="{status}"}}"#);
        assert_eq!(get(&s, &series), 0.0);
    }

    // Three jobs that publish (1000 + 234·2 + 1234 bytes), one refused, one remote failure.
    let inbox = env.path("in");
    env.drop_renamed("in", "a.json", r#"{"output":"a.bin","sources":["a"]}"#);
    env.drop_renamed(
        "in",
        "bb.json",
        r#"{"output":"bb.bin","sources":["b","b"]}"#,
    );
    env.drop_renamed(
        "in",
        "ab.json",
        r#"{"output":"ab.bin","sources":["a","b"]}"#,
    );
    env.drop_renamed(
        "in",
        "x.json",
        r#"{"output":"x.bin","sources":["missing"]}"#,
    );
    let url = format!("http://127.0.0.1:{port}/gone.bin");
    env.drop_renamed(
        "in",
        "r.json",
        &format!(r#"{{"output":"r.bin","sources":["{url}"]}}"#),
    );
    wait_until(Duration::from_secs(20), || count_results(&inbox) == 5);
    let kinds: Vec<String> = results(&inbox)
        .iter()
        .filter_map(|r| r["error"]["kind"].as_str().map(str::to_owned))
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(sorted, ["remote_failed", "source_not_found"], "{kinds:?}");
    // Counted as filed: wait for the last count rather than assume it precedes the file.
    let ok = format!(r#"concatd_jobs_total{{rule="{rule}",status="succeeded"}}"#);
    let failed = format!(r#"concatd_jobs_total{{rule="{rule}",status="failed"}}"#);
    wait_until(Duration::from_secs(5), || {
        let s = samples();
        s.get(&ok).copied().unwrap_or(0.0) + s.get(&failed).copied().unwrap_or(0.0) == 5.0
    });
    let s = samples();
    let one = |name: &str| get(&s, &format!(r#"{name}{{rule="{rule}"}}"#));
    assert_eq!(get(&s, &ok), 3.0);
    assert_eq!(get(&s, &failed), 2.0);
    assert_eq!(
        one("concatd_bytes_written_total"),
        (1000 + 468 + 1234) as f64
    );
    assert_eq!(one("concatd_copied_bytes_total"), 0.0);
    assert_eq!(one("concatd_job_duration_seconds_count"), 5.0);
    let summed: u64 = results(&inbox)
        .iter()
        .map(|r| r["duration_ms"].as_u64().unwrap())
        .sum();
    assert!((one("concatd_job_duration_seconds_sum") - summed as f64 / 1000.0).abs() < 1e-6);
    assert_eq!(
        get(
            &s,
            &format!(r#"concatd_job_duration_seconds_bucket{{le="+Inf",rule="{rule}"}}"#)
        ),
        5.0
    );
    // 3 attempts: the first and two retries, then remote_failed.
    assert_eq!(one("concatd_remote_retries_total"), 2.0);
    assert_eq!(one("concatd_jobs_running"), 0.0);
    assert_eq!(one("concatd_queue_depth"), 0.0);
    assert!(one("concatd_watch_rescans_total") >= 1.0);
    assert_eq!(fs::read(env.path("out/ab.bin")).unwrap().len(), 1234);

    shutdown.cancel();
    daemon.join().unwrap().unwrap();
}
