//! Crashes, restarts and shutdown: exactly one result per manifest whatever happens.

use std::fs;
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

/// Sources for a job that takes a while: `n` files of 64 KiB; their concatenation.
fn big_job(env: &Env, n: usize) -> (String, Vec<u8>) {
    let mut expected = Vec::new();
    let mut list = Vec::new();
    for i in 0..n {
        let chunk: Vec<u8> = (0..65536u32)
            .map(|j| (j.wrapping_mul(31) ^ i as u32) as u8)
            .collect();
        env.data(&format!("p{i}"), &chunk);
        expected.extend_from_slice(&chunk);
        list.push(format!("\"p{i}\""));
    }
    (
        format!(
            r#"{{"output":"big/out.bin","sources":[{}]}}"#,
            list.join(",")
        ),
        expected,
    )
}

#[test]
fn kill_9_during_a_large_job_then_restart_gives_one_complete_result() {
    let env = Env::new("    write_mode: pwrite\n");
    let (manifest, expected) = big_job(&env, 1500);
    let d = env.start();
    env.drop_renamed("in", "big.json", &manifest);
    // Kill once the job is under way: its temporary output exists.
    wait_until(Duration::from_secs(10), || {
        !temps_in(&env.path("out")).is_empty() || count_results(&env.path("in")) > 0
    });
    let caught_mid_job = !temps_in(&env.path("out")).is_empty();
    d.kill9();
    assert!(caught_mid_job, "the job finished before it could be killed");
    assert_eq!(count_results(&env.path("in")), 0);
    assert_eq!(job_dirs(&env.path("in")).len(), 1, "left claimed");
    let d = env.start();
    wait_until(Duration::from_secs(20), || {
        count_results(&env.path("in")) == 1
    });
    let r = &results(&env.path("in"))[0];
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(fs::read(env.path("out/big/out.bin")).unwrap(), expected);
    assert!(temps_in(&env.path("out")).is_empty());
    wait_until(Duration::from_secs(5), || {
        job_dirs(&env.path("in")).is_empty()
    });
    assert_eq!(d.stop(), 0);
    assert_eq!(count_results(&env.path("in")), 1);
}

#[test]
fn a_crash_between_publish_and_result_is_filed_as_success_not_output_exists() {
    // The state a kill -9 leaves after the output's rename and before the result: the output
    // and its sidecar temp in place, the journal and the manifest in the job folder.
    let env = Env::new("");
    env.data("a", b"published bytes");
    let id = "01a2000000007000800000000000abcd";
    let job = env.path("in/.work").join(id);
    fs::create_dir_all(&job).unwrap();
    fs::write(job.join("p.json"), r#"{"output":"p.bin","sources":["a"]}"#).unwrap();
    let out = env.path("out/p.bin");
    fs::write(&out, b"published bytes").unwrap();
    let hash = blake3::hash(b"published bytes").to_hex().to_string();
    let sidecar_temp = env.path(&format!("out/.concatd-{id}.b3.tmp"));
    fs::write(&sidecar_temp, format!("{hash}  p.bin\n")).unwrap();
    let meta = fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    let journal = serde_json::json!({
        "output": out, "dev": meta.dev(), "ino": meta.ino(), "size": 15,
        "blake3": hash, "sources": 1, "started_at": "2026-01-01T00:00:00Z"
    });
    fs::write(job.join(".publish.json"), journal.to_string()).unwrap();
    // A second interrupted job that never published: rerun, its temp removed.
    let id2 = "01a2000000007000800000000000abce";
    let job2 = env.path("in/.work").join(id2);
    fs::create_dir_all(&job2).unwrap();
    fs::write(
        job2.join("q.json"),
        r#"{"output":"q.bin","sources":["a","a"]}"#,
    )
    .unwrap();
    fs::write(env.path(&format!("out/.concatd-{id2}.tmp")), b"partial").unwrap();
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 2
    });
    let p: Value =
        serde_json::from_slice(&fs::read(env.path("in/done/p.json.result.json")).unwrap()).unwrap();
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["job_id"], id);
    assert_eq!(p["blake3"], hash.as_str());
    assert_eq!(
        fs::read_to_string(env.path("out/p.bin.b3")).unwrap(),
        format!("{hash}  p.bin\n")
    );
    let q: Value =
        serde_json::from_slice(&fs::read(env.path("in/done/q.json.result.json")).unwrap()).unwrap();
    assert_eq!(q["status"], "succeeded", "{q}");
    assert_eq!(q["job_id"], id2);
    assert_eq!(
        fs::read(env.path("out/q.bin")).unwrap(),
        b"published bytespublished bytes"
    );
    assert!(temps_in(&env.path("out")).is_empty());
    wait_until(Duration::from_secs(5), || {
        job_dirs(&env.path("in")).is_empty()
    });
    assert_eq!(d.stop(), 0);
}

#[test]
fn manifests_named_publish_json_and_filing_are_done_with_their_own_contents() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"own");
    let d = env.start();
    let texts = [
        ("publish.json", r#"{"output":"pj.bin","sources":["a"]}"#),
        ("filing", r#"{"output":"fi.bin","sources":["a","a"]}"#),
    ];
    for (name, text) in texts {
        env.drop_renamed("in", name, text);
    }
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 2
    });
    for (name, text) in texts {
        assert_eq!(
            fs::read_to_string(env.path("in/done").join(name)).unwrap(),
            text,
            "{name}"
        );
        let r: Value = serde_json::from_slice(
            &fs::read(env.path("in/done").join(format!("{name}.result.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(r["manifest"], name);
    }
    assert_eq!(fs::read(env.path("out/pj.bin")).unwrap(), b"own");
    assert_eq!(fs::read(env.path("out/fi.bin")).unwrap(), b"ownown");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_crashed_job_of_a_manifest_named_publish_json_is_recovered_not_deleted() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"kept");
    let job = env.path("in/.work/01a2000000007000800000000000abcf");
    fs::create_dir_all(&job).unwrap();
    let text = r#"{"output":"kept.bin","sources":["a"]}"#;
    fs::write(job.join("publish.json"), text).unwrap();
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(
        fs::read_to_string(env.path("in/done/publish.json")).unwrap(),
        text
    );
    let r = &results(&env.path("in"))[0];
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(fs::read(env.path("out/kept.bin")).unwrap(), b"kept");
    assert_eq!(d.stop(), 0);
}

#[test]
fn sigterm_aborts_after_grace_and_the_next_start_finishes_the_job() {
    let env = Env::new("    write_mode: pwrite\n");
    let (manifest, expected) = big_job(&env, 1500);
    let text = fs::read_to_string(env.rules())
        .unwrap()
        .replace("shutdown_grace: 10s", "shutdown_grace: 0s");
    env.write_rules(&text);
    let d = env.start();
    env.drop_renamed("in", "big.json", &manifest);
    // SIGTERM once the copy is under way: its temporary output exists (~100 MB to go).
    wait_until(Duration::from_secs(10), || {
        !temps_in(&env.path("out")).is_empty() || count_results(&env.path("in")) > 0
    });
    assert!(
        !temps_in(&env.path("out")).is_empty(),
        "the job finished before it could be stopped"
    );
    let log = d.stderr.clone();
    assert_eq!(d.stop(), 0);
    // Aborted: nothing published, nothing partial, no result, the manifest still claimed.
    assert_eq!(count_results(&env.path("in")), 0, "the job was not aborted");
    assert!(!env.path("out/big/out.bin").exists());
    assert_eq!(job_dirs(&env.path("in")).len(), 1);
    // At most the hidden temporary output is kept, for the rerun to resume in, and then only
    // with the pieces journal that describes it.
    let temps = temps_in(&env.path("out"));
    let job = &job_dirs(&env.path("in"))[0];
    assert!(
        temps.is_empty()
            || (temps == [format!(".concatd-{job}.tmp")]
                && env.path("in/.work").join(job).join(".pieces").exists()),
        "{temps:?}"
    );
    assert!(
        fs::read_to_string(log)
            .unwrap()
            .contains("cancelled at shutdown")
    );
    let d = env.start();
    wait_until(Duration::from_secs(20), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(results(&env.path("in"))[0]["status"], "succeeded");
    assert_eq!(fs::read(env.path("out/big/out.bin")).unwrap(), expected);
    assert_eq!(d.stop(), 0);
}
