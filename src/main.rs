//! concatd: concatenate objects into one verified, atomically published output.
//! This file only parses arguments and dispatches; see the modules for how things work.

mod checksum;
mod cli;
mod commands;
mod config;
mod crash;
mod daemon;
mod job;
mod logging;
mod manifest;
mod output;
mod plan;
mod result;
mod source;
mod yaml;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match commands::dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("concatd: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
