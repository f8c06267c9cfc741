//! Properties of planning and copying: whatever the sources (empty, ranged, repeated, some from a
//! source list) and whatever the piece size, workers and write mode, the plan's offsets and the
//! output are exactly the concatenation, and the merged BLAKE3 is that of the concatenation.

use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;

use super::JobContext;
use super::copy::Copy;
use crate::checksum::{PieceHasher, Pieces, TreeMerger};
use crate::config::{Rule, WriteMode};
use crate::manifest::Manifest;
use crate::output::OutputTarget;
use crate::source::Sources;

/// Bytes of file `i`: distinct per file and per position, so a misplaced range shows.
fn content(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k.wrapping_mul(31) ^ (k >> 8) ^ (i * 101)) as u8)
        .collect()
}

/// One manifest item: a file, and maybe a range of it given as fractions of what is left.
#[derive(Debug, Clone)]
struct Item {
    file: usize,
    range: Option<(u16, u16)>,
}

fn rule(dir: &Path) -> Rule {
    for d in ["in", "out", "data"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let text = "log_dir: logs\nrules:\n  - name: p\n    watch: in\n    output_root: out\n    source_root: data\n    fsync: false\n";
    let rules = crate::config::parse(text, &dir.join("rules.yaml"), dir).unwrap();
    rules.rules[0].clone()
}

/// Write the files and a manifest whose items from `listed` on come from a source list; the
/// manifest's path and, per item, the bytes it stands for.
fn setup(dir: &Path, sizes: &[usize], items: &[Item], listed: usize) -> (Manifest, Vec<Vec<u8>>) {
    let files: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| content(i, n))
        .collect();
    for (i, bytes) in files.iter().enumerate() {
        std::fs::write(dir.join("data").join(format!("f{i}")), bytes).unwrap();
    }
    let mut json = Vec::new();
    let mut want = Vec::new();
    for item in items {
        let bytes = &files[item.file % files.len()];
        let name = format!("f{}", item.file % files.len());
        match item.range {
            None => {
                json.push(serde_json::json!(name));
                want.push(bytes.clone());
            }
            Some((a, b)) => {
                let offset = a as usize % (bytes.len() + 1);
                let length = b as usize % (bytes.len() - offset + 1);
                json.push(serde_json::json!({"path": name, "offset": offset, "length": length}));
                want.push(bytes[offset..offset + length].to_vec());
            }
        }
    }
    let listed = listed.min(json.len());
    let list = json.split_off(listed);
    let mut manifest = serde_json::json!({"output": "o.bin", "sources": json});
    if !list.is_empty() {
        std::fs::write(
            dir.join("data/list.json"),
            serde_json::to_vec(&list).unwrap(),
        )
        .unwrap();
        manifest["source_lists"] = serde_json::json!(["list.json"]);
    }
    let path = dir.join("in/m.json");
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    (
        Manifest::load(&path, crate::manifest::Origin::Given).unwrap(),
        want,
    )
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    prop::collection::vec(
        (
            0usize..6,
            prop::option::weighted(0.4, (any::<u16>(), any::<u16>())),
        )
            .prop_map(|(file, range)| Item { file, range }),
        1..16,
    )
}

fn mode() -> impl Strategy<Value = WriteMode> {
    prop_oneof![
        Just(WriteMode::Pwrite),
        Just(WriteMode::CopyFileRange),
        Just(WriteMode::Mmap),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn plan_and_copy_give_exactly_the_concatenation(
        sizes in prop::collection::vec(0usize..4096, 1..6),
        items in items(),
        listed in 0usize..20,
        max_piece in 1u64..20_000,
        workers in 1usize..4,
        mode in mode(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rule = rule(dir.path());
        let (manifest, want) = setup(dir.path(), &sizes, &items, listed);
        let whole: Vec<u8> = want.concat();
        let sources = Sources::new(&rule).unwrap();
        let plan = super::plan::build(&manifest, &sources, rule.max_output_size, super::Refusals::First, Some(dir.path()), &mut |_| {}).unwrap();

        // The plan's offsets and lengths lay the items end to end.
        prop_assert_eq!(plan.total, whole.len() as u64);
        prop_assert_eq!(plan.count(), want.len() as u64);
        let mut at = 0;
        for (n, bytes) in (1..).zip(&want) {
            prop_assert_eq!((plan.start(n), plan.len(n)), (at, bytes.len() as u64));
            prop_assert_eq!(&whole[at as usize..][..bytes.len()], &bytes[..]);
            at += bytes.len() as u64;
        }

        let target = OutputTarget::new(rule.output_root.local().unwrap(), &manifest.output).unwrap();
        let temp = target.create_temp("props", plan.total).unwrap();
        let mode = if mode == WriteMode::Mmap && !temp.allocated() { WriteMode::Pwrite } else { mode };
        let ctx = JobContext {
            rule: &rule,
            job_id: "props".into(),
            cancel: None,
            progress: None,
            before_publish: None,
            pieces: None,
        };
        let copy = Copy {
            plan: &plan,
            workers,
            max_piece,
            manifest: &manifest,
            sources: &sources,
            out: temp.file(),
            out_path: target.path(),
            mode,
            share: false,
            ctx: &ctx,
            journal: std::sync::Mutex::new(None),
            resumed: Vec::new(),
        };
        let hash = copy.run().unwrap();
        let mut written = vec![0; whole.len()];
        temp.file().read_exact_at(&mut written, 0).unwrap();
        prop_assert!(written == whole, "output differs from the concatenation");
        prop_assert_eq!(hash, blake3::hash(&whole));
    }

    /// Any split of the output into tree pieces (any piece size, any busy regions split further),
    /// hashed in any order, merges into the BLAKE3 of the whole.
    #[test]
    fn pieces_in_any_order_merge_into_the_hash_of_the_whole(
        total in 0usize..70_000,
        max_len in 1u64..40_000,
        busy in prop::collection::vec(0u64..70_000, 0..4),
        order in any::<u64>(),
    ) {
        let bytes = content(7, total);
        let pieces: Vec<_> = Pieces::new(total as u64, max_len, |start, len| {
            busy.iter().any(|&b| (start..start + len).contains(&b))
        })
        .collect();
        let mut at = 0;
        for (i, p) in pieces.iter().enumerate() {
            prop_assert_eq!((p.index, p.start), (i as u64, at));
            prop_assert!(p.len > 0 && p.len <= max_len.max(crate::checksum::CHUNK_LEN));
            at = p.end();
        }
        prop_assert_eq!(at, total as u64);
        // A scrambled but complete order.
        let mut idx: Vec<usize> = (0..pieces.len()).collect();
        let mut state = order | 1;
        for i in (1..idx.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            idx.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut merger = TreeMerger::new();
        for i in idx {
            let p = pieces[i];
            let mut h = PieceHasher::new(&p);
            h.update(&bytes[p.start as usize..p.end() as usize]);
            merger.add(&p, h.finish());
        }
        prop_assert_eq!(merger.finish(total as u64), Some(blake3::hash(&bytes)));
    }
}
