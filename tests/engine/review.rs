//! Found by an adversarial review.

use super::*;

/// With overwrite on, a folder at the output's path cannot be replaced: the
/// job is refused up front as `output_not_allowed`, not `internal` at the rename after the copy.
#[test]
fn a_folder_at_the_output_path_is_refused_before_the_copy_even_with_overwrite() {
    let env = Env::new("    overwrite: true\n");
    env.data("a", &vec![5u8; 1 << 20]);
    std::fs::create_dir_all(env.path("out/dir/inner")).unwrap();
    let r = env.fails(
        "m.json",
        r#"{"output":"dir","sources":["a"]}"#,
        "output_not_allowed",
        "dir",
    );
    assert!(env.path("out/dir/inner").is_dir());
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("folder"), "{message}");
}

/// `n` one-byte sources from a list into an output root that is a tmpfs of `size`: the job
/// succeeds with exactly those bytes (needs root; skipped without, failing under CI).
fn listed_one_byte_sources_fit(size: &str, n: usize) {
    let env = Env::new("    fsync: false\n");
    let Some(_fs) = support::Tmpfs::mount_or_skip(&env.path("out"), size) else {
        return;
    };
    env.data("x", b"a");
    env.data("list.txt", "x\n".repeat(n).as_bytes());
    let m =
        json(serde_json::json!({"output": "o.bin", "sources": [], "source_lists": ["list.txt"]}));
    let r = env.succeeds(&m, "o.bin", &vec![b'a'; n]);
    assert_eq!(r["sources"], n);
}

/// A plan table whose spill fills the output's filesystem half way through a write falls back
/// to memory — and gives the half-written bytes back: 131,073 one-byte sources (a 128 KiB
/// output, a 2 MiB table) fit a 1.5 MiB output filesystem. Before the fix the failed spill kept
/// its 512 KiB of half-written entries and the job failed `no_space` at the allocation.
#[test]
fn a_spill_that_fills_the_output_filesystem_leaves_room_for_the_output() {
    listed_one_byte_sources_fit("1536k", 131_073);
}

/// A spill that succeeds still takes room on the output's filesystem: 65,537 one-byte sources
/// (a 64 KiB output, a 1 MiB table) on a 1,060 KiB output filesystem. Before the fix the job
/// failed `no_space` at the allocation although the output alone fits; now the table moves back
/// to memory and the allocation is tried again.
#[test]
fn a_spilled_table_gives_way_to_the_output_on_a_full_filesystem() {
    listed_one_byte_sources_fit("1060k", 65_537);
}
