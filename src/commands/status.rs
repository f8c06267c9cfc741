//! `concatd status`: the document of [`crate::inbox::status`], as a table or as JSON.

use std::io::Write;
use std::path::Path;

use super::load_rules;

pub fn run(config: &Path, json: bool) -> anyhow::Result<i32> {
    let rules = match load_rules(config) {
        Ok(rules) => rules,
        Err(code) => return Ok(code),
    };
    let status = crate::inbox::status(&rules.rules);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "{:<20} {:>8} {:>8} {:>8} {:>8}  DAEMON",
        "RULE", "WAITING", "RUNNING", "DONE", "FAILED"
    )?;
    for r in &status.rules {
        let daemon = match &r.daemon {
            Some(d) => format!("pid {} since {}", d.pid, d.since),
            None => "none (claimed jobs resume when one starts)".to_owned(),
        };
        writeln!(
            out,
            "{:<20} {:>8} {:>8} {:>8} {:>8}  {daemon}",
            r.name, r.waiting, r.running, r.done, r.failed
        )?;
    }
    for r in &status.rules {
        for res in &r.latest {
            let what = match (&res.output, &res.error) {
                (_, Some(e)) => format!("failed {}: {}", e.kind, e.message),
                (Some(out), None) => format!("succeeded -> {out}"),
                (None, None) => "succeeded".to_owned(),
            };
            writeln!(
                out,
                "{}  {}  {}  {what}",
                res.finished_at, r.name, res.manifest
            )?;
        }
    }
    Ok(0)
}
