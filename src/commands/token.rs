//! `concatd token`: a new API token, printed once; only its SHA-256 is kept, appended to the
//! `api.tokens_file` (created mode 0600). A running daemon rereads the file when it changes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{EXIT_USAGE, load_rules};

pub fn run(config: &Path, names: &[String], all: bool) -> anyhow::Result<i32> {
    let rules = match load_rules(config) {
        Ok(rules) => rules,
        Err(code) => return Ok(code),
    };
    let Some(file) = rules.api.as_ref().and_then(|a| a.tokens_file.clone()) else {
        eprintln!(
            "concatd: {} has no api.tokens_file: add one to the api section first",
            config.display()
        );
        return Ok(EXIT_USAGE);
    };
    let unknown: Vec<&String> = names.iter().filter(|n| rules.rule(n).is_none()).collect();
    if !unknown.is_empty() {
        for n in unknown {
            eprintln!("concatd: rule '{n}' is not in {}", config.display());
        }
        return Ok(EXIT_USAGE);
    }
    let scope = if all {
        "*".to_owned()
    } else {
        let mut n = names.to_vec();
        n.sort();
        n.dedup();
        n.join(",")
    };
    let token = crate::api::new_token()?;
    let line = format!("{} {scope}\n", crate::api::token_hash_hex(&token));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // One write of one line: appends of concurrent `concatd token` runs never interleave.
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    println!("{token}");
    Ok(0)
}
