//! What the Debian package ships, checked without building it (`.ci/run` builds, installs and
//! inspects the real .deb): the packaged unit keeps the hardening of systemd/concatd.service,
//! the default rules file works once its folders exist, and build.rs's man pages and
//! completions are there and well formed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `section: key=value` lines of a unit file, comments and blank lines dropped.
fn directives(path: &Path) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        out.insert(format!("{section} {line}"));
    }
    out
}

#[test]
fn the_packaged_unit_keeps_the_hardening_of_the_reference_unit() {
    let packaged = directives(&repo("debian/concatd.service"));
    let reference = directives(&repo("systemd/concatd.service"));
    // Where the package puts things is all that may differ.
    let placed = |d: &String| {
        [
            "ExecStart=",
            "ReadWritePaths=",
            "Documentation=",
            "RuntimeDirectory",
        ]
        .iter()
        .any(|k| d.split_once(' ').unwrap().1.starts_with(k))
    };
    let a: BTreeSet<&String> = packaged.iter().filter(|d| !placed(d)).collect();
    let b: BTreeSet<&String> = reference.iter().filter(|d| !placed(d)).collect();
    assert_eq!(
        a.symmetric_difference(&b).collect::<Vec<_>>(),
        Vec::<&&String>::new()
    );
    assert!(
        packaged.contains("[Service] ExecStart=/usr/bin/concatd run -c /etc/concatd/rules.yaml")
    );
    assert!(packaged.contains("[Service] ReadWritePaths=/var/lib/concatd /var/log/concatd"));
    assert!(packaged.contains("[Service] User=concatd"));
}

#[test]
fn the_default_rules_file_checks_and_runs_a_job_once_its_folders_exist() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().display().to_string();
    let text = fs::read_to_string(repo("debian/rules.yaml"))
        .unwrap()
        .replace("/var/lib/concatd", &format!("{base}/lib"))
        .replace("/var/log/concatd", &format!("{base}/log"));
    assert!(!text.contains("/var/"), "{text}");
    let rules = root.path().join("rules.yaml");
    fs::write(&rules, &text).unwrap();
    let check = || {
        Command::new(bin())
            .args(["check", "-c"])
            .arg(&rules)
            .output()
            .unwrap()
    };
    assert_ne!(
        check().status.code(),
        Some(0),
        "the folders do not exist yet"
    );
    // What postinst makes.
    for d in ["lib/inbox", "lib/out", "lib/sources", "log"] {
        fs::create_dir_all(root.path().join(d)).unwrap();
    }
    let out = check();
    assert_exit(&out, 0);
    fs::write(root.path().join("lib/sources/a"), b"pack").unwrap();
    let manifest = root.path().join("m.json");
    fs::write(&manifest, r#"{"output":"x/y.bin","sources":["a","a"]}"#).unwrap();
    let out = Command::new(bin())
        .args(["once", "-c"])
        .arg(&rules)
        .args(["--rule", "default"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(
        fs::read(root.path().join("lib/out/x/y.bin")).unwrap(),
        b"packpack"
    );
}

/// build.rs writes the pages and completions beside the binary, in `<profile>/assets/`.
fn assets() -> PathBuf {
    bin().parent().unwrap().join("assets")
}

#[test]
fn the_man_pages_cover_every_command_and_the_reference() {
    let man = assets().join("man");
    let help = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    // The commands, as `concatd --help` lists them (clap's `help` aside).
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 7, "{commands:?}");
    let page = fs::read_to_string(man.join("concatd.1")).unwrap();
    for c in &commands {
        assert!(
            man.join(format!("concatd-{c}.1")).is_file(),
            "no page for {c}"
        );
        assert!(
            page.contains(&format!("concatd\\-{c}(1)")),
            "{c} not in concatd.1"
        );
    }
    for section in [
        "COMMANDS",
        "Exit codes",
        "THE RULES FILE",
        "THE MANIFEST",
        "THE RESULT",
        "ERROR KINDS",
        "FILES",
    ] {
        assert!(page.contains(section), "no {section}");
    }
    // Every error kind of SPEC.md, and every rules key of the reference, as a tagged entry.
    for kind in [
        "invalid_manifest",
        "source_not_allowed",
        "source_not_found",
        "source_not_regular",
        "source_read_failed",
        "source_changed",
        "source_archived",
        "remote_failed",
        "size_mismatch",
        "checksum_mismatch",
        "output_not_allowed",
        "output_exists",
        "too_large",
        "no_space",
        "cancelled",
        "internal",
    ] {
        assert!(
            page.contains(&format!(".TP\n\\fB{kind}\\fR\n")),
            "no entry for {kind}"
        );
    }
    for key in [
        "log_dir",
        "max_jobs",
        "output_root",
        "remote.chunk_size",
        "expect.blake3",
    ] {
        assert!(page.contains(&format!("\\fB{key}\\fR")), "no {key}");
    }
    // Plain ASCII roff (non-ASCII characters escaped), and clean for groff when it is there.
    assert!(page.is_ascii());
    match Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(man.join("concatd.1"))
        .output()
    {
        Ok(out) => {
            assert!(out.status.success());
            assert_eq!(String::from_utf8_lossy(&out.stderr), "", "groff warnings");
        }
        Err(_) if std::env::var_os("CI").is_none() => eprintln!("groff not installed: skipped"),
        Err(e) => panic!("groff: {e}"),
    }
}

#[test]
fn completions_for_bash_zsh_and_fish_know_the_commands() {
    let dir = assets().join("completions");
    let bash = fs::read_to_string(dir.join("concatd.bash")).unwrap();
    let zsh = fs::read_to_string(dir.join("_concatd")).unwrap();
    let fish = fs::read_to_string(dir.join("concatd.fish")).unwrap();
    assert!(zsh.starts_with("#compdef concatd"));
    for (text, long) in [(&bash, "--"), (&zsh, "--"), (&fish, "-l ")] {
        for word in ["submit", "plan", "logs"] {
            assert!(text.contains(word), "{word}");
        }
        for flag in ["wait", "config", "json"] {
            assert!(text.contains(&format!("{long}{flag}")), "{flag}");
        }
    }
    assert!(fish.contains("complete -c concatd"));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(dir.join("concatd.bash"))
        .status()
        .unwrap();
    assert!(syntax.success());
}
