//! One module per subcommand. Each returns the process exit code; `anyhow` lives only here.

mod check;
mod logs;
mod once;
mod plan;
mod run;
mod status;
mod submit;
mod token;

use crate::cli::Command;
use crate::config::{self, ConfigError, Rules};

/// Exit code for bad usage or an invalid config.
pub const EXIT_USAGE: i32 = 2;

/// Run a subcommand; its exit code.
pub fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Check { config } => check::run(&config),
        Command::Once {
            config,
            rule,
            manifest,
        } => once::run(&config, &rule, &manifest),
        Command::Plan {
            config,
            rule,
            manifest,
            json,
        } => plan::run(&config, &rule, &manifest, json),
        Command::Run { config } => run::run(&config),
        Command::Submit {
            rule,
            manifest,
            wait,
            timeout,
            api: Some(api),
            ..
        } => submit::run_api(&api, &rule, &manifest, wait, timeout),
        Command::Submit {
            config,
            rule,
            manifest,
            wait,
            timeout,
            api: None,
        } => {
            let config = config.expect("clap requires --config without --api");
            submit::run(&config, &rule, &manifest, wait, timeout)
        }
        Command::Token { config, rules, all } => token::run(&config, &rules, all),
        Command::Status { config, json } => status::run(&config, json),
        Command::Logs {
            config,
            rule,
            follow,
            lines,
        } => logs::run(&config, &rule, follow, lines),
    }
}

/// Load the rules file, printing its problems; `Err(exit code)` when it is unusable.
pub fn load_rules(path: &std::path::Path) -> Result<Rules, i32> {
    config::load(path).map_err(|e: ConfigError| {
        eprintln!("concatd: {e}");
        EXIT_USAGE
    })
}

/// Load the rules file and pick one rule; `Err(exit code)` when either is unusable.
pub fn load_rule(path: &std::path::Path, name: &str) -> Result<crate::config::Rule, i32> {
    let rules = load_rules(path)?;
    rules.rule(name).cloned().ok_or_else(|| {
        eprintln!("concatd: rule '{name}' is not in {}", path.display());
        EXIT_USAGE
    })
}

/// Logs of foreground commands go to stderr; `RUST_LOG` sets the level (default: warnings).
/// Field values are escaped as in the daemon's logs ([`crate::logging::EscapedFields`]).
pub fn init_stderr_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .fmt_fields(crate::logging::EscapedFields)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
