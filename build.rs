//! Generates the man pages and the shell completions from the CLI definition (src/cli.rs) at
//! build time, so they can never drift from the flags: `concatd.1` (the commands, then the
//! reference of docs/reference.md: rules keys, manifest, result JSON, error kinds, exit codes),
//! one `concatd-COMMAND.1` per command, and bash, zsh and fish completions.
//!
//! They are written to OUT_DIR and mirrored to `<target>/<profile>/assets/`, the one place
//! cargo-deb can name them (`target/release/assets/...` in `[package.metadata.deb]`; it maps
//! `target/release/` to the real target folder and knows nothing of OUT_DIR hashes).

use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

#[path = "build/man.rs"]
mod man;

/// What src/cli.rs takes from the library, for the build script (which cannot link it).
mod config {
    pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
        humantime::parse_duration(text).map_err(|e| e.to_string())
    }
}

fn main() -> std::io::Result<()> {
    for input in [
        "build.rs",
        "build/man.rs",
        "src/cli.rs",
        "docs/reference.md",
    ] {
        println!("cargo:rerun-if-changed={input}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let assets = out.join("assets");
    fresh(&assets)?;
    generate(&assets)?;
    // OUT_DIR is <target>/<profile>/build/concatd-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let published = profile_dir.join("assets");
        fresh(&published)?;
        mirror(&assets, &published)?;
    }
    Ok(())
}

fn generate(assets: &Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let man_dir = assets.join("man");
    let completions = assets.join("completions");
    for dir in [&man_dir, &completions] {
        std::fs::create_dir_all(dir)?;
    }
    // clap's `help` command gets no page of its own (it prints the pages' text).
    let mut man_cmd = cli::Cli::command().disable_help_subcommand(true);
    man_cmd.build();
    let mut cmd = cli::Cli::command();
    let reference = std::fs::read_to_string("docs/reference.md")?;
    let version = man_cmd.get_version().unwrap_or_default().to_owned();
    man::write_pages(&man_cmd, &reference, &version, &man_dir)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "concatd", &completions)?;
    }
    Ok(())
}

/// An empty `dir` (nothing left from an earlier build, such as a page of a removed command).
fn fresh(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)
}

/// Copy every file of `from` into `to` (same layout), replacing what is there.
fn mirror(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            mirror(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
