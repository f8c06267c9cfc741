//! `concatd check`: validate the rules file and its folders.

use std::path::Path;

use super::load_rules;

pub fn run(config: &Path) -> anyhow::Result<i32> {
    let rules = match load_rules(config) {
        Ok(rules) => rules,
        Err(code) => return Ok(code),
    };
    let mut problems = 0;
    for rule in &rules.rules {
        // The daemon must be able to claim manifests and move them to done/ and failed/.
        if let Err(e) = rustix::fs::access(&rule.watch, rustix::fs::Access::WRITE_OK) {
            eprintln!(
                "rule '{}': key 'watch': {} is not writable: {e}",
                rule.name,
                rule.watch.display()
            );
            problems += 1;
        }
        // An S3 root is checked by the store at each job's first request (a check that needs no
        // network stays fast and offline).
        if let Some(root) = rule.output_root.local()
            && let Err(e) = rustix::fs::access(root, rustix::fs::Access::WRITE_OK)
        {
            eprintln!(
                "rule '{}': key 'output_root': {} is not writable: {e}",
                rule.name,
                root.display()
            );
            problems += 1;
        }
    }
    // The file is valid (an invalid one exits 2 above); a folder the daemon could not use is a
    // failed check: exit 1, as the spec has it.
    if problems > 0 {
        return Ok(1);
    }
    println!("{}: {} rule(s) OK", config.display(), rules.rules.len());
    Ok(0)
}
