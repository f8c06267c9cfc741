//! `concatd logs`: the last lines of a rule's log, and with `-f` everything appended after, across
//! rotation (like `tail -F`: when `<rule>.log` is replaced, the rest of the old file is read, then
//! the new one from its start).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::{EXIT_USAGE, load_rules};
use crate::logging::{print_tail, rule_log_path};

pub fn run(config: &Path, rule: &str, follow: bool, lines: usize) -> anyhow::Result<i32> {
    let rules = match load_rules(config) {
        Ok(rules) => rules,
        Err(code) => return Ok(code),
    };
    if rules.rule(rule).is_none() {
        eprintln!("concatd: rule '{rule}' is not in {}", config.display());
        return Ok(EXIT_USAGE);
    }
    let path = rule_log_path(&rules.log_dir, rule);
    let mut out = std::io::stdout().lock();
    let mut current = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => None,
        Err(e) => {
            eprintln!("concatd: {}: {e}", path.display());
            return Ok(1);
        }
    };
    if let Some(f) = &mut current {
        print_tail(f, lines, &mut out)?;
    }
    if !follow {
        return Ok(0);
    }
    let mut buf = vec![0; 64 << 10];
    loop {
        if let Some(f) = &mut current {
            copy_new(f, &mut buf, &mut out)?;
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(200));
        // Rotated or recreated: finish the old file, then follow the new one from its start.
        let same = match (&current, std::fs::metadata(&path)) {
            (Some(f), Ok(now)) => f.metadata().is_ok_and(|m| m.ino() == now.ino()),
            (None, Ok(_)) => false,
            (_, Err(_)) => true,
        };
        if !same {
            if let Some(f) = &mut current {
                copy_new(f, &mut buf, &mut out)?;
            }
            current = File::open(&path).ok();
        } else if let Some(f) = &mut current
            && f.metadata()?.len() < f.stream_position()?
        {
            f.seek(SeekFrom::Start(0))?; // truncated in place
        }
    }
}

fn copy_new(f: &mut File, buf: &mut [u8], out: &mut impl Write) -> std::io::Result<()> {
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
    }
}
