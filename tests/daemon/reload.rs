//! Reloading the rules: SIGHUP, or the rules file saved.

use std::fs;
use std::time::Duration;

use crate::support::*;

#[test]
fn sighup_adds_and_removes_rules_and_an_invalid_file_is_kept_out() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"A");
    let d = env.start();
    let both = format!(
        "log_dir: logs\nrules:\n{}{}",
        rule("r1", "in", "    fsync: false\n"),
        rule("r2", "in2", "    fsync: false\n")
    );
    env.write_rules(&both);
    d.signal("HUP");
    wait_until(Duration::from_secs(10), || {
        d.log().contains("added=[\"r2\"]")
    });
    env.drop_renamed("in2", "n.json", r#"{"output":"n.bin","sources":["a"]}"#);
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in2")) == 1
    });
    assert_eq!(results(&env.path("in2"))[0]["rule"], "r2");
    assert!(env.path("logs/r2.log").exists());

    // An invalid file: refused, both rules keep running.
    env.write_rules(&format!("{both}bogus_key: 1\n"));
    d.signal("HUP");
    wait_until(Duration::from_secs(10), || d.log().contains("refused"));
    assert!(d.log().contains("bogus_key"), "the error names the key");
    env.drop_renamed("in", "k.json", r#"{"output":"k.bin","sources":["a"]}"#);
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });

    // r1 removed: its folder is no longer taken from.
    env.write_rules(&format!("log_dir: logs\nrules:\n{}", rule("r2", "in2", "")));
    d.signal("HUP");
    wait_until(Duration::from_secs(10), || {
        d.log().contains("removed=[\"r1\"]")
    });
    env.drop_renamed(
        "in",
        "late.json",
        r#"{"output":"late.bin","sources":["a"]}"#,
    );
    env.drop_renamed("in2", "m.json", r#"{"output":"m.bin","sources":["a"]}"#);
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in2")) == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(env.path("in/late.json").exists());
    assert_eq!(count_results(&env.path("in")), 1);
    assert_eq!(d.stop(), 0);
}

#[test]
fn saving_the_rules_file_reloads_without_a_signal() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"E");
    let d = env.start();
    env.write_rules(&format!(
        "log_dir: logs\nrules:\n{}{}",
        rule("r1", "in", "    fsync: false\n"),
        rule("r2", "in2", "    fsync: false\n")
    ));
    wait_until(Duration::from_secs(10), || {
        d.log().contains("added=[\"r2\"]")
    });
    env.drop_renamed("in2", "e.json", r#"{"output":"e.bin","sources":["a"]}"#);
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in2")) == 1
    });
    assert_eq!(fs::read(env.path("out/e.bin")).unwrap(), b"E");
    assert_eq!(d.stop(), 0);
}

#[test]
fn an_edited_rule_applies_to_jobs_claimed_after_the_reload() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"R");
    let d = env.start();
    env.drop_renamed(
        "in",
        "before.json",
        r#"{"output":"before.bin","sources":["a"]}"#,
    );
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    assert!(env.path("out/before.bin.b3").exists());
    env.write_rules(&format!(
        "log_dir: logs\nrules:\n{}",
        rule("r1", "in", "    fsync: false\n    checksum_file: false\n")
    ));
    d.signal("HUP");
    wait_until(Duration::from_secs(10), || {
        d.log().contains("changed=[\"r1\"]")
    });
    env.drop_renamed(
        "in",
        "after.json",
        r#"{"output":"after.bin","sources":["a"]}"#,
    );
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 2
    });
    assert_eq!(fs::read(env.path("out/after.bin")).unwrap(), b"R");
    assert!(!env.path("out/after.bin.b3").exists());
    assert_eq!(d.stop(), 0);
}
