//! The `concatd` binary: parse the command line, dispatch, exit with the command's code.
//! Everything else lives in the library (`src/lib.rs`).

use clap::Parser;

fn main() {
    let cli = concatd::cli::Cli::parse();
    let code = match concatd::commands::dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("concatd: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
