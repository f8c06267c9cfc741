//! The last lines of a log file: `concatd logs` and `GET /v1/rules/{rule}/logs`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

/// Print the last `n` lines of `f`, leaving `f` at its end.
pub fn print_tail(f: &mut File, n: usize, out: &mut impl Write) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    // Read back in growing blocks until n lines are in view (logs can be big).
    let mut start = len;
    let mut block = 64 << 10;
    loop {
        start = start.saturating_sub(block);
        f.seek(SeekFrom::Start(start))?;
        let mut text = Vec::new();
        f.take(len - start).read_to_end(&mut text)?;
        let count = text.iter().filter(|&&b| b == b'\n').count();
        if count > n || start == 0 {
            let all: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            // The text ends with a newline: the last piece is empty.
            let complete = if text.ends_with(b"\n") {
                &all[..all.len() - 1]
            } else {
                &all[..]
            };
            let skip = if start > 0 { 1 } else { 0 }; // a partial first line
            let usable = &complete[skip.min(complete.len())..];
            for line in &usable[usable.len().saturating_sub(n)..] {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            }
            f.seek(SeekFrom::Start(len))?;
            return Ok(());
        }
        block *= 4;
    }
}
