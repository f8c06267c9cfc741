//! `concatd submit`: drop a manifest into a rule's folder atomically; with `--wait`, wait for its
//! result. With `--api`, the same through the daemon's API (which makes the very same drop).
//!
//! The drop is [`crate::inbox::drop_manifest`]: a temporary file of its own, renamed in without
//! replacing a waiting manifest. Waiting is [`crate::inbox::wait_result`], shared with the API's
//! sync calls: woken by the result's arrival in `done/` or `failed/`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::{EXIT_USAGE, load_rule};
use crate::api::client::{self, Addr, Answer};
use crate::inbox::{DONE_DIR, Dropped, FAILED_DIR, ResultWatch, Waited, is_candidate};
use crate::result::JobResult;

pub fn run(
    config: &Path,
    rule_name: &str,
    manifest: &Path,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let rule = match load_rule(config, rule_name) {
        Ok(rule) => rule,
        Err(code) => return Ok(code),
    };
    let rule = &rule;
    let Some(name) = manifest.file_name().filter(|n| is_candidate(n)) else {
        eprintln!(
            "concatd: {} cannot be a manifest name (hidden, .tmp, .part or ~ names are ignored)",
            manifest.display()
        );
        return Ok(EXIT_USAGE);
    };
    let bytes = match read_manifest(manifest) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    let ino = crate::inbox::drop_manifest(&rule.watch, name, &bytes)?;
    let dropped = Dropped {
        watch: rule.watch.clone(),
        name: name.to_owned(),
        ino,
    };
    if !wait {
        println!("{}", dropped.path().display());
        return Ok(0);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let waited = runtime.block_on(async {
        let events = ResultWatch::start(&rule.watch);
        let until = timeout.map(|t| tokio::time::Instant::now() + t);
        crate::inbox::wait_result(&dropped, &events, until, true).await
    });
    match waited {
        Waited::Filed(result) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(result.exit_code())
        }
        // Waiting is pointless with nobody to run the job: say so at once (and again should the
        // daemon stop while we wait). The manifest stays dropped and runs when a daemon starts.
        Waited::NoDaemon => {
            eprintln!(
                "concatd: no daemon is watching {} (rule '{}'): {} stays in the folder \
                 (or claimed, if a daemon took it before it stopped) and runs when one \
                 starts (concatd run -c {})",
                rule.watch.display(),
                rule.name,
                dropped.path().display(),
                config.display()
            );
            Ok(1)
        }
        Waited::TimedOut => {
            eprintln!(
                "concatd: timed out after {} waiting for the result of {} (it is still queued or \
                 running; its result will appear in {}/{DONE_DIR}/ or {}/{FAILED_DIR}/)",
                humantime::format_duration(timeout.unwrap_or_default()),
                dropped.path().display(),
                rule.watch.display(),
                rule.watch.display()
            );
            Ok(1)
        }
    }
}

/// Read the manifest as the job will (a regular file, never blocking on a FIFO), so a path that
/// can never be a manifest is refused here, not submitted.
fn read_manifest(manifest: &Path) -> Result<Vec<u8>, i32> {
    crate::manifest::read_text(manifest, crate::manifest::Origin::Given)
        .map(String::into_bytes)
        .map_err(|e| {
            eprintln!("concatd: {e}");
            1
        })
}

/// How long one call may go beyond the wait it asked the server for.
const CALL_SLACK: Duration = Duration::from_secs(30);
/// How often a job is asked about once a sync call came back still waiting.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// `submit --api ADDR`: POST the manifest; with `--wait`, a sync call (then, past the server's
/// `wait_max`, polling `GET /v1/jobs/{id}`) until the result or `--timeout`.
pub fn run_api(
    addr: &str,
    rule: &str,
    manifest: &Path,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let addr: Addr = match addr.parse() {
        Ok(a) => a,
        Err(m) => {
            eprintln!("concatd: --api: {m}");
            return Ok(EXIT_USAGE);
        }
    };
    let bytes = match read_manifest(manifest) {
        Ok(b) => Bytes::from(b),
        Err(code) => return Ok(code),
    };
    let yaml = manifest
        .extension()
        .is_some_and(|e| e == "yaml" || e == "yml");
    let content_type = if yaml {
        "application/yaml"
    } else {
        "application/json"
    };
    let token = std::env::var("CONCATD_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if matches!(addr, Addr::Http(_)) && token.is_none() {
        eprintln!("concatd: --api {addr}: set CONCATD_TOKEN to a token made by `concatd token`");
        return Ok(EXIT_USAGE);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let start = tokio::time::Instant::now();
        let deadline = timeout.map(|t| start + t);
        let query = match (wait, timeout) {
            (false, _) => String::new(),
            (true, None) => "?wait=true".to_owned(),
            (true, Some(t)) => format!("?wait={}ms", t.as_millis().max(1)),
        };
        let path = format!("/v1/rules/{}/jobs{query}", urlencode(rule));
        let limit = timeout.unwrap_or(Duration::from_secs(24 * 3600)) + CALL_SLACK;
        // One call: its answer, or the exit code when it got none or was refused.
        let ask = async |method, path: &str, content_type, body, limit| match client::call(
            &addr,
            method,
            path,
            token.as_deref(),
            content_type,
            body,
            limit,
        )
        .await
        {
            Ok(a) => refused(&addr, rule, &a).map_or(Ok(a), Err),
            Err(e) => {
                eprintln!("concatd: {e}");
                Err(1)
            }
        };
        let answer = match ask("POST", &path, Some(content_type), bytes, limit).await {
            Ok(a) => a,
            Err(code) => return Ok(code),
        };
        if answer.status != 202 {
            return print_result(&answer);
        }
        let accepted: serde_json::Value = serde_json::from_slice(&answer.body)?;
        let id = accepted["job_id"].as_str().unwrap_or_default().to_owned();
        if !wait {
            println!("{}", serde_json::to_string_pretty(&accepted)?);
            return Ok(0);
        }
        // Still waiting after the server's wait_max: ask about the job until it is done.
        loop {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                eprintln!(
                    "concatd: timed out after {} waiting for job {id} (it is still queued or \
                     running; ask {addr} for /v1/jobs/{id})",
                    humantime::format_duration(timeout.unwrap_or_default()),
                );
                return Ok(1);
            }
            tokio::time::sleep(POLL_EVERY).await;
            let answer = match ask(
                "GET",
                &format!("/v1/jobs/{id}"),
                None,
                Bytes::new(),
                CALL_SLACK,
            )
            .await
            {
                Ok(a) => a,
                Err(code) => return Ok(code),
            };
            let job: serde_json::Value = serde_json::from_slice(&answer.body)?;
            if let Some(result) = job.get("result") {
                return print_job(&serde_json::from_value(result.clone())?);
            }
        }
    })
}

/// The answer when it refused the call (auth, unknown rule, size): a clear message, exit 1 (2
/// for an unknown rule, as folder submit).
fn refused(addr: &Addr, rule: &str, a: &Answer) -> Option<i32> {
    let said = serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&a.body).trim().to_owned());
    let (message, code) = match a.status {
        401 => (
            format!(
                "{addr} refused the token (401: {said}): set CONCATD_TOKEN to a token made by \
                 `concatd token`"
            ),
            1,
        ),
        403 => (format!("{addr} refused the call (403: {said})"), 1),
        404 => (
            format!("{addr}: rule '{rule}' or the job is unknown (404: {said})"),
            EXIT_USAGE,
        ),
        413 => (
            format!("{addr}: the manifest is too large for the API (413: {said})"),
            1,
        ),
        400 | 405 | 408 | 411 | 415 => (format!("{addr}: {} {said}", a.status), 1),
        _ => return None,
    };
    eprintln!("concatd: {message}");
    Some(code)
}

/// A sync call's answer: the result JSON (a failed job's too), or an error the server gave.
fn print_result(a: &Answer) -> anyhow::Result<i32> {
    match serde_json::from_slice::<JobResult>(&a.body) {
        Ok(result) => print_job(&result),
        Err(_) => {
            eprintln!(
                "concatd: the API answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body).trim()
            );
            Ok(1)
        }
    }
}

/// Print a job's result; its exit code.
fn print_job(result: &JobResult) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(result)?);
    Ok(result.exit_code())
}

/// A rule name in a URL path (names are [a-z0-9_-]; anything else is escaped, never trusted).
fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
