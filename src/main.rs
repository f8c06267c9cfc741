//! The `concatd` binary: parse the command line, dispatch, exit with the command's code.
//! Everything else lives in the library (`src/lib.rs`).

use std::process::ExitCode;

use clap::Parser;

/// The one place where the outcome of a command becomes the process's exit code: 0 success,
/// 1 the job (or check) failed, 2 bad usage or an invalid config (clap exits 2 by itself).
fn main() -> ExitCode {
    let cli = concatd::cli::Cli::parse();
    let code = match concatd::commands::dispatch(cli.command) {
        Ok(code) => code,
        // `concatd status | head`: the reader has all it wanted; not an error worth a word.
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            eprintln!("concatd: {e:#}");
            1
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
