//! The `concatd` binary: parse the command line, dispatch, exit with the command's code.
//! Everything else lives in the library (`src/lib.rs`).

use clap::Parser;

fn main() {
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
    std::process::exit(code);
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
