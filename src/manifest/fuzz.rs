//! Fuzzing on stable: bounded, deterministic mutation runs of the manifest parser (JSON, YAML,
//! the COS body), the source-list reader (text and JSON-array forms) and the rules file parser.
//!
//! Each run starts from the seeds kept in `fuzz/corpus/{manifest,list,rules}/` and feeds
//! [`proptest`] a fixed-seed stream of mutations of them (bit flips, inserted bytes and tokens,
//! deleted, duplicated, repeated and spliced ranges). Properties: no panic; no case takes long
//! (inputs are bounded, so neither may time or memory); errors are typed, one line, and never
//! repeat more than a short excerpt of the input. `CONCATD_FUZZ_CASES=N` sets the number of
//! mutated cases per target (default [`DEFAULT_CASES`]) for a longer run by hand.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use super::{MAX_INLINE_SOURCES, Manifest, ManifestError, list::MAX_LIST_ITEM_BYTES, stream_list};

/// Mutated cases per target in `cargo test`.
const DEFAULT_CASES: u32 = 6_000;

/// No input grows past this (the 64 KiB caps of list items are tested on their own).
const MAX_INPUT: usize = 32 << 10;

/// No one case may take this long (a debug build on a busy machine included).
const CASE_LIMIT: Duration = Duration::from_secs(3);

/// The longest run of input characters an error message may repeat.
const MAX_ECHO: usize = 64;

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b": ",
    b"\n",
    b"\r\n",
    b"- ",
    b"  ",
    b"\t",
    b"#",
    b"*a",
    b"&a ",
    b"<<: ",
    b"---\n",
    b"!!binary ",
    b"!!str ",
    b"? ",
    b"|\n",
    b"\\u0000",
    b"\0",
    b"\\",
    b"\xff",
    b"\xed\xa0\x80",
    "\u{e9}".as_bytes(),
    "\u{202e}".as_bytes(),
    b"\\ud800",
    b"18446744073709551616",
    b"1e999",
    b"-1",
    b"0x10",
    b"null",
    b"true",
    b"no",
    b"\"output\"",
    b"\"sources\"",
    b"\"source_lists\"",
    b"\"sourceList\"",
    b"\"key\"",
    b"\"expect\"",
    b"sources: ",
    b"output: ",
    b"{\"path\":\"a\"}",
    b"{\"url\":\"https://h/x\"}",
    b"\"blake3\":",
    b"\"offset\":",
    b"rules:\n  - name: ",
    b"watch: ",
    b"max_output_size: ",
];

fn cases() -> u32 {
    std::env::var("CONCATD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The seeds of one corpus, by file name (sorted: the run is the same everywhere).
fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(kind);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "{} holds the seeds", dir.display());
    seeds
}

/// One mutation: what, where, and two sizes or indexes, all taken modulo what fits.
type Op = (u8, u32, u32, u16);

fn mutate(seeds: &[(String, Vec<u8>)], seed: usize, ops: &[Op]) -> Vec<u8> {
    let mut data = seeds[seed].1.clone();
    for &(kind, a, b, c) in ops {
        let len = data.len();
        let at = if len == 0 { 0 } else { a as usize % (len + 1) };
        match kind % 8 {
            0 if len > 0 => {
                let i = at.min(len - 1);
                data[i] ^= 1 << (b % 8);
            }
            1 => data.insert(at, b as u8),
            2 | 3 => {
                let t = TOKENS[b as usize % TOKENS.len()];
                data.splice(at..at, t.iter().copied());
            }
            4 => {
                let end = (at + c as usize % 64).min(len);
                data.drain(at..end);
            }
            5 => {
                // Repeat a short range, sometimes many times (long lines, long strings).
                let end = (at + 1 + b as usize % 16).min(len);
                let piece = data[at..end].to_vec();
                let times = if c % 16 == 0 {
                    c as usize * 4
                } else {
                    c as usize % 8
                };
                let room = MAX_INPUT.saturating_sub(len) / piece.len().max(1);
                let repeated = piece.repeat(times.min(room));
                data.splice(end..end, repeated);
            }
            6 => {
                // Splice in a range of another seed.
                let other = &seeds[b as usize % seeds.len()].1;
                if !other.is_empty() {
                    let from = c as usize % other.len();
                    let end = (from + 1 + (a as usize >> 8) % 256).min(other.len());
                    data.splice(at..at, other[from..end].iter().copied());
                }
            }
            _ => {
                // Nest: wrap a range in brackets or braces.
                let end = (at + c as usize % 32).min(len);
                let (open, close) = if b % 2 == 0 {
                    (b'[', b']')
                } else {
                    (b'{', b'}')
                };
                data.insert(end, close);
                data.insert(at, open);
            }
        }
        data.truncate(MAX_INPUT);
    }
    data
}

/// Run `check` on every seed, then on `cases()` mutations of them; returns the executions.
fn fuzz(kind: &str, check: impl Fn(&str, &[u8]) -> Result<(), TestCaseError>) -> u64 {
    let seeds = corpus(kind);
    let runs = AtomicU64::new(0);
    let timed = |name: &str, data: &[u8]| {
        runs.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        check(name, data)?;
        let took = started.elapsed();
        if took >= CASE_LIMIT {
            // Kept for a look by hand (the failure is shrunk, but each try of a slow case is slow).
            let keep = std::env::temp_dir().join(format!("concatd-fuzz-slow-{kind}"));
            let _ = std::fs::write(&keep, data);
            prop_assert!(
                false,
                "{name}: {} bytes took {took:?} (input kept in {})",
                data.len(),
                keep.display()
            );
        }
        Ok(())
    };
    for (name, data) in &seeds {
        if let Err(e) = timed(name, data) {
            panic!("seed {kind}/{name}: {e}");
        }
    }
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 2000,
        max_shrink_time: 20_000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::XorShift));
    let strategy = (0..seeds.len(), proptest::collection::vec(any::<Op>(), 1..8));
    let result = runner.run(&strategy, |(seed, ops)| {
        let data = mutate(&seeds, seed, &ops);
        timed(&seeds[seed].0, &data)
    });
    if let Err(e) = result {
        panic!("fuzz {kind}: {e}");
    }
    let n = runs.load(Ordering::Relaxed);
    eprintln!("fuzz {kind}: {n} executions");
    n
}

/// An error message is one line, not long, and repeats no long run of the input.
fn short_message(message: &str, input: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.contains('\n'), "multi-line message: {message:?}");
    prop_assert!(message.chars().count() <= 600, "long message: {message:?}");
    // Any echo of MAX_ECHO characters holds a window of MAX_ECHO - 8 starting at a multiple of 8.
    let chars: Vec<char> = message.chars().collect();
    let window = MAX_ECHO - 8;
    let mut start = 0;
    while start + window <= chars.len() {
        let piece: String = chars[start..start + window].iter().collect();
        prop_assert!(
            !input.contains(&piece),
            "message echoes the input: {message:?}"
        );
        start += 8;
    }
    Ok(())
}

#[test]
fn fuzz_manifest_parser() {
    let n = fuzz("manifest", |name, data| {
        let text = String::from_utf8_lossy(data);
        // The seed's extension picks the format; a JSON seed is also tried as YAML (YAML is
        // nearly a superset of JSON, a different parser on the same bytes).
        let mut paths = vec![Path::new(name)];
        if name.ends_with(".json") {
            paths.push(Path::new("as.yaml"));
        }
        for path in paths {
            match Manifest::parse(&text, path) {
                Ok(m) => {
                    prop_assert!(m.sources.len() <= MAX_INLINE_SOURCES);
                    prop_assert!(!m.output.is_empty());
                    for s in &m.sources {
                        prop_assert!(!s.location.to_string().contains('\0'));
                    }
                }
                Err(e) => {
                    prop_assert!(
                        matches!(
                            e,
                            ManifestError::Syntax { .. } | ManifestError::Invalid { .. }
                        ),
                        "{e:?}"
                    );
                    short_message(&e.to_string(), &text)?;
                }
            }
        }
        Ok(())
    });
    assert!(n > 0);
}

#[test]
fn fuzz_source_list_reader() {
    let n = fuzz("list", |_, data| {
        let mut items = 0u64;
        let result = stream_list(Box::new(Cursor::new(data.to_vec())), "l", &mut |spec| {
            items += 1;
            let len = spec.location.to_string().len();
            if len > MAX_LIST_ITEM_BYTES {
                return Err(ManifestError::List {
                    list: "l".into(),
                    message: format!("an item of {len} bytes was let through"),
                });
            }
            Ok(())
        });
        if let Err(e) = result {
            let message = e.to_string();
            prop_assert!(!message.contains("was let through"), "{message}");
            short_message(&message, &String::from_utf8_lossy(data))?;
        }
        prop_assert!(items <= data.len() as u64);
        Ok(())
    });
    assert!(n > 0);
}

#[test]
fn fuzz_rules_parser() {
    let base = tempfile::tempdir().unwrap();
    let n = fuzz("rules", |_, data| {
        let text = String::from_utf8_lossy(data);
        if let Err(e) = crate::config::parse(&text, &base.path().join("rules.yaml"), base.path()) {
            // The operator's own file: its errors may show its lines, but must render.
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    });
    assert!(n > 0);
}

/// Found by `fuzz_rules_parser`: rules missing their folders were compared pairwise, as empty
/// paths every other folder "lies inside": 2,700 such rules gave 9.4 M problems in 29 s.
#[test]
fn many_rules_missing_their_folders_give_problems_linear_in_rules() {
    let base = tempfile::tempdir().unwrap();
    let text = format!(
        "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: out\n{}",
        "  - nat: out\n".repeat(2000)
    );
    let started = Instant::now();
    let e = crate::config::parse(&text, &base.path().join("rules.yaml"), base.path()).unwrap_err();
    assert!(started.elapsed() < CASE_LIMIT, "{:?}", started.elapsed());
    assert!(
        e.to_string().lines().count() < 5 * 2001,
        "problems per pair of rules"
    );
}
