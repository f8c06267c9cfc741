//! Found by an adversarial review: recovery after the rules changed between crash and restart.

use std::fs;
use std::time::Duration;

use super::support::*;

/// A job stopped mid-copy keeps its temporary output to resume in; if the rule's `output_root`
/// changed before the restart, the rerun publishes in the new root and the old temporary file
/// (as large as the output) must not stay behind in the old one.
#[test]
fn a_changed_output_root_leaves_no_temporary_file_in_the_old_one() {
    let env = Env::new("    write_mode: pwrite\n    fsync: false\n");
    let want = interrupt_a_big_job(&env);
    assert_eq!(count_results(&env.path("in")), 0, "aborted, not finished");
    fs::create_dir(env.path("out2")).unwrap();
    env.write_rules(
        &fs::read_to_string(env.rules())
            .unwrap()
            .replace("output_root: out\n", "output_root: out2\n"),
    );
    let d = env.start_named("restarted");
    wait_until(Duration::from_secs(60), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(d.stop(), 0);
    let r = results(&env.path("in")).pop().unwrap();
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(fs::read(env.path("out2/big.bin")).unwrap() == want);
    assert_eq!(
        temps_in(&env.path("out")),
        Vec::<String>::new(),
        "the old output root still holds the interrupted job's temporary file"
    );
}

/// A job stopped mid-copy keeps its temporary output to resume in; if its rerun then fails before
/// reopening it (here: the output appeared meanwhile, `output_exists`), that file must go with
/// the failed result instead of staying beside the outputs forever.
#[test]
fn a_resumable_job_that_fails_on_its_rerun_leaves_no_temporary_file() {
    let env = Env::new("    write_mode: pwrite\n    fsync: false\n");
    interrupt_a_big_job(&env);
    fs::write(env.path("out/big.bin"), b"someone else's").unwrap();
    let d = env.start_named("restarted");
    wait_until(Duration::from_secs(60), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(d.stop(), 0);
    let r = results(&env.path("in")).pop().unwrap();
    assert_eq!(r["error"]["kind"], "output_exists", "{r}");
    assert_eq!(
        fs::read(env.path("out/big.bin")).unwrap(),
        b"someone else's"
    );
    assert_eq!(
        temps_in(&env.path("out")),
        Vec::<String>::new(),
        "the interrupted job's temporary file is left behind"
    );
}

/// Start a daemon whose jobs get 1 ms of grace at shutdown, drop a job of 8 × 16 MiB sources, stop
/// the daemon once the job has journaled a piece, and check its temporary output was kept to
/// resume in. Returns the bytes the output should hold.
fn interrupt_a_big_job(env: &Env) -> Vec<u8> {
    env.write_rules(
        &fs::read_to_string(env.rules())
            .unwrap()
            .replace("shutdown_grace: 10s", "shutdown_grace: 1ms"),
    );
    let mut want = Vec::new();
    let mut names = Vec::new();
    for i in 0..8u8 {
        // Large enough that the copy is still running when the stop arrives.
        let b: Vec<u8> = (0..16usize << 20)
            .map(|j| (j as u8) ^ i.wrapping_mul(37))
            .collect();
        env.data(&format!("p{i}"), &b);
        want.extend_from_slice(&b);
        names.push(format!("p{i}"));
    }
    let d = env.start();
    let m = serde_json::json!({"output": "big.bin", "sources": names});
    env.drop_renamed("in", "big.json", &m.to_string());
    let work = env.path("in/.work");
    wait_until(Duration::from_secs(30), || {
        walk(&work)
            .iter()
            .any(|p| p.ends_with(".pieces") && fs::metadata(p).is_ok_and(|m| m.len() > 64))
    });
    assert_eq!(d.stop(), 0);
    assert_eq!(
        temps_in(&env.path("out")).len(),
        1,
        "the temporary output is kept"
    );
    want
}

/// A daemon job (which keeps a pieces journal) whose plan table spilled onto a nearly full output
/// filesystem: 65,537 one-byte sources (a 64 KiB output, a 1 MiB table) on a 1,060 KiB tmpfs.
/// Before the fix the job failed `no_space` although the output alone fits; now the table moves
/// back to memory and the temporary file is allocated again.
#[test]
fn a_spilled_plan_table_gives_way_to_the_output_in_the_daemon() {
    let env = Env::new("    fsync: false\n");
    let out = env.path("out");
    let Some(_fs) = Tmpfs::mount_or_skip(&out, "1060k") else {
        return;
    };
    env.data("x", b"a");
    env.data("list.txt", "x\n".repeat(65_537).as_bytes());
    let d = env.start();
    env.drop_renamed(
        "in",
        "m.json",
        r#"{"output": "o.bin", "sources": [], "source_lists": ["list.txt"]}"#,
    );
    wait_until(Duration::from_secs(60), || {
        count_results(&env.path("in")) == 1
    });
    assert_eq!(d.stop(), 0);
    let r = results(&env.path("in")).pop().unwrap();
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(fs::read(out.join("o.bin")).unwrap() == vec![b'a'; 65_537]);
}
