//! The command line of `SPEC.md`. Exit codes: 0 success, 1 the job or check failed, 2 bad usage
//! or an invalid config (clap's own usage errors already exit 2).
//!
//! build.rs compiles this file too (man pages, completions): use only std, clap and
//! `crate::config::parse_duration` here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Concatenate objects into one verified, atomically published output.
#[derive(Debug, Parser)]
#[command(name = "concatd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
    },
    /// Validate the rules file and its folders.
    Check {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
    },
    /// Run one manifest in the foreground and print its result JSON.
    Once {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
        /// The rule whose settings apply.
        #[arg(long, value_name = "NAME")]
        rule: String,
        /// The manifest (JSON, or YAML for .yaml/.yml).
        manifest: PathBuf,
    },
    /// Show everything a manifest's job would decide, moving no byte; exit 1 listing every
    /// refusal when it would fail.
    Plan {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
        /// The rule whose settings apply.
        #[arg(long, value_name = "NAME")]
        rule: String,
        /// The manifest (JSON, or YAML for .yaml/.yml).
        manifest: PathBuf,
        /// Print one JSON document (the plan, or the failed result) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop a manifest into a rule's folder (or send it to the API with --api); with --wait,
    /// wait for and print its result.
    Submit {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md. Not needed
        /// with --api.
        #[arg(
            short = 'c',
            long = "config",
            value_name = "RULES.yaml",
            required_unless_present = "api"
        )]
        config: Option<PathBuf>,
        /// The rule whose folder the manifest is dropped into.
        #[arg(long, value_name = "NAME")]
        rule: String,
        /// The manifest (JSON, or YAML for .yaml/.yml); copied in under its own name.
        manifest: PathBuf,
        /// Wait for the result and exit 0 (succeeded) or 1 (failed).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. 30s, 5m).
        #[arg(long, value_name = "DUR", value_parser = parse_duration, requires = "wait")]
        timeout: Option<Duration>,
        /// Submit through the daemon's API instead of the folder: unix:/path/api.sock or
        /// http://host:port (the token comes from CONCATD_TOKEN).
        #[arg(long, value_name = "ADDR")]
        api: Option<String>,
    },
    /// Make a new API token for some rules: printed once on stdout, its hash appended to the
    /// api.tokens_file.
    Token {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
        /// A rule the token may use (repeat for more).
        #[arg(long = "rule", value_name = "NAME", required_unless_present = "all")]
        rules: Vec<String>,
        /// The token may use every rule, present and future.
        #[arg(long, conflicts_with = "rules")]
        all: bool,
    },
    /// Show per rule whether a daemon watches it, its counts and the latest results.
    Status {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Print (and with -f follow) a rule's log.
    Logs {
        /// The rules file (YAML): log_dir and the rules, see docs/reference.md.
        #[arg(short = 'c', long = "config", value_name = "RULES.yaml")]
        config: PathBuf,
        /// The rule.
        rule: String,
        /// Keep following, across rotation, like `tail -F`.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines to print from the end.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
}
