//! Per-source checksums, checked against the bytes as they landed in the output.
//!
//! Hashing the output's range (from the page cache, right after the copy) rather than the source
//! checks what was actually written, and costs a pass only for sources that carry a `blake3`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::JobError;
use super::plan::Plan;
use crate::manifest::Manifest;
use crate::source::Sources;

/// Check every source that declares a `blake3` against its range of the output `out`.
pub(super) fn source_hashes(
    plan: &Plan,
    manifest: &Manifest,
    sources: &Sources,
    out: &File,
) -> Result<(), JobError> {
    let mut block = vec![0u8; 1 << 20];
    manifest.for_each_source(plan.reopen_lists(sources), |n, spec| {
        if n > plan.count() {
            return Err(super::copy::changed_lists());
        }
        let Some(want) = spec.blake3 else {
            return Ok(());
        };
        let mut hasher = blake3::Hasher::new();
        let (mut at, end) = (plan.start(n), plan.start(n) + plan.len(n));
        while at < end {
            let len = (end - at).min(block.len() as u64) as usize;
            out.read_exact_at(&mut block[..len], at)
                .map_err(|e| JobError::Internal(format!("reading back the output: {e}")))?;
            if len >= 128 << 10 {
                hasher.update_rayon(&block[..len]);
            } else {
                hasher.update(&block[..len]);
            }
            at += len as u64;
        }
        let got = hasher.finalize();
        if got != want {
            return Err(JobError::ChecksumMismatch {
                number: Some(n),
                message: format!(
                    "source {n} ({}): expected blake3 {} got {}",
                    spec.location,
                    want.to_hex(),
                    got.to_hex()
                ),
            });
        }
        Ok(())
    })?;
    Ok(())
}
