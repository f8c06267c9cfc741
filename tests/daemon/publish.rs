//! Publishing: outputs and sidecars as one unit, output names refused before any byte, the job
//! journal on a full watch folder.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

/// The `.b3` line that belongs to the output at `out` (today's bytes there).
pub fn sidecar_of(out: &Path) -> String {
    let name = out.file_name().unwrap().to_str().unwrap();
    format!(
        "{}  {name}\n",
        blake3::hash(&fs::read(out).unwrap()).to_hex()
    )
}

/// Every temporary name of ours (`.concatd-*`) under `dir`, folders included.
pub fn our_temps(dir: &Path) -> Vec<String> {
    let mut found = temps_in(dir);
    found.sort();
    found
}

#[test]
fn concurrent_overwrite_jobs_leave_each_output_with_its_own_sidecar() {
    // 4 manifests per output, 4 jobs at a time: they publish over each other.
    let env = Env::new("    fsync: false\n    concurrency: 4\n    overwrite: true\n");
    let (outputs, per) = (250, 4);
    for o in 0..outputs {
        for k in 0..per {
            env.data(
                &format!("s{o}-{k}"),
                format!("output {o} by job {k}\n").as_bytes(),
            );
        }
    }
    for o in 0..outputs {
        for k in 0..per {
            env.drop_renamed(
                "in",
                &format!("m{o:03}-{k}.json"),
                &format!(r#"{{"output":"o/{o}.bin","sources":["s{o}-{k}"]}}"#),
            );
        }
    }
    let d = env.start();
    wait_until(Duration::from_secs(60), || {
        count_results(&env.path("in")) == outputs * per
    });
    let failed: Vec<Value> = results(&env.path("in"))
        .into_iter()
        .filter(|r| r["status"] != "succeeded")
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let mut mixed = Vec::new();
    for o in 0..outputs {
        let out = env.path(&format!("out/o/{o}.bin"));
        let b3 = fs::read_to_string(env.path(&format!("out/o/{o}.bin.b3"))).unwrap();
        if b3 != sidecar_of(&out) {
            mixed.push(o);
        }
    }
    assert!(
        mixed.is_empty(),
        "outputs whose .b3 is another job's: {mixed:?}"
    );
    assert_eq!(our_temps(&env.path("out")), Vec::<String>::new());
    assert_eq!(d.stop(), 0);
}

/// The failed result of manifest `name`.
fn failed_result(env: &Env, name: &str) -> Value {
    let path = env.path("in/failed").join(format!("{name}.result.json"));
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn output_names_that_cannot_be_published_are_refused_before_any_byte() {
    let env = Env::new("    fsync: false\n");
    env.data("a", b"never published");
    let root_len = env.path("out").as_os_str().len();
    // A whole path over PATH_MAX (4096 bytes) made of names that fit.
    let deep = std::iter::repeat_n("d".repeat(200), 4096 / 201 + 1)
        .collect::<Vec<_>>()
        .join("/");
    assert!(root_len + 1 + deep.len() + 6 > 4096);
    let cases = [
        ("nul.json", "x\\u0000y.bin".to_owned()),
        ("nul-dir.json", "a\\u0000b/x.bin".to_owned()),
        ("long-name.json", "n".repeat(256)),
        ("long-dir.json", format!("{}/x.bin", "d".repeat(256))),
        // 253 bytes: the output fits, its `.b3` sidecar would not.
        ("no-room-for-b3.json", "s".repeat(253)),
        ("deep.json", format!("{deep}/x.bin")),
    ];
    let d = env.start();
    for (name, output) in &cases {
        env.drop_renamed(
            "in",
            name,
            &format!(r#"{{"output":"{output}","sources":["a"]}}"#),
        );
    }
    wait_until(Duration::from_secs(20), || {
        count_results(&env.path("in")) == cases.len()
    });
    for (name, _) in &cases {
        let r = failed_result(&env, name);
        assert_eq!(r["error"]["kind"], "output_not_allowed", "{name}: {r}");
    }
    // Refused before any byte: no copy began (the log has no "planned" line for any job).
    assert!(!d.log().contains("planned"), "{}", d.log());
    assert_eq!(our_temps(&env.path("out")), Vec::<String>::new());
    assert_eq!(d.stop(), 0);
}

/// Fill the filesystem holding `dir` up: write `filler` until ENOSPC.
fn fill(filler: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(filler).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_watch_folder_while_journaling_is_no_space() {
    let env = Env::new("");
    env.data("a", b"bytes");
    let Some(_mount) = Tmpfs::mount_or_skip(&env.path("in"), "256k") else {
        return;
    };
    let d = env.start();
    // The manifest first, then no room for anything else.
    let part = env.path("in/.m.json.part");
    fs::write(&part, r#"{"output":"full.bin","sources":["a"]}"#).unwrap();
    fill(&env.path("in/.filler"));
    fs::rename(&part, env.path("in/m.json")).unwrap();
    wait_until(Duration::from_secs(10), || d.log().contains("kind="));
    let log = d.log();
    assert!(log.contains("kind=no_space"), "{log}");
    assert!(!env.path("out/full.bin").exists());
    assert_eq!(our_temps(&env.path("out")), Vec::<String>::new());
    // Room again: the next start runs the job, which was left claimed.
    fs::remove_file(env.path("in/.filler")).unwrap();
    assert_eq!(d.stop(), 0);
    let d = env.start();
    wait_until(Duration::from_secs(10), || {
        count_results(&env.path("in")) == 1
    });
    let r = &results(&env.path("in"))[0];
    assert!(
        r["status"] == "succeeded" || r["error"]["kind"] == "no_space",
        "{r}"
    );
    assert_eq!(d.stop(), 0);
}
