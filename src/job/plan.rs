//! The planning pass: every source checked and measured before any byte is written.
//!
//! The plan keeps 16 bytes per source — where it ends in the output and the [`Pin`] it was seen
//! with — and nothing else: paths and ranges are streamed from the manifest again by the copy
//! pass, so a 1,000,000-part job plans in 16 MB whatever its paths, and never holds its items.

use rayon::prelude::*;

use super::JobError;
use crate::manifest::{Location, Manifest, SourceSpec};
use crate::source::{Pin, Probe, Sources};

/// Sizes, offsets and identities of a job's sources.
#[derive(Debug, Default)]
pub struct Plan {
    /// Output size in bytes.
    pub total: u64,
    /// End offset in the output of source `n` at `ends[n - 1]`.
    ends: Vec<u64>,
    pins: Vec<Pin>,
    /// Pins of the source lists, in order, so the copy pass reads the very lists planned.
    pub list_pins: Vec<Pin>,
    /// Some source carries its own `blake3`.
    pub source_hashes: bool,
    /// Some source is remote (HTTP(S) or S3).
    pub remote: bool,
    /// Every source's range and [`Probe::identity`], in order: what the output's bytes are made
    /// of (see [`Plan::fingerprint`]).
    identity: blake3::Hasher,
}

impl Plan {
    /// Number of sources.
    pub fn count(&self) -> u64 {
        self.ends.len() as u64
    }

    /// Output offset where source `n` (1-based) starts.
    pub fn start(&self, n: u64) -> u64 {
        if n <= 1 { 0 } else { self.ends[n as usize - 2] }
    }

    /// Bytes source `n` contributes.
    pub fn len(&self, n: u64) -> u64 {
        self.ends[n as usize - 1] - self.start(n)
    }

    pub fn pin(&self, n: u64) -> Pin {
        self.pins[n as usize - 1]
    }

    /// Opens the source lists again, in order, refusing any that is not the list planned: the
    /// `open_list` argument of [`Manifest::for_each_source`] for the passes after planning.
    pub fn reopen_lists<'a>(
        &'a self,
        sources: &'a Sources,
    ) -> impl FnMut(&Location) -> Result<Box<dyn std::io::Read + Send>, JobError> + 'a {
        let mut pins = self.list_pins.iter();
        move |list| {
            let (reader, _) = sources
                .open_list(list, pins.next().copied())
                .map_err(|source| JobError::List { source })?;
            Ok(reader)
        }
    }

    /// A hash of everything the output's bytes follow from: each source's identity (device,
    /// inode, size, mtime, ctime; or URL, ETag, Last-Modified, size), the range taken of it, and
    /// the total. Two plans with the same fingerprint build the same bytes.
    pub fn fingerprint(&self) -> blake3::Hash {
        let mut h = self.identity.clone();
        h.update(&self.total.to_le_bytes());
        h.update(&self.count().to_le_bytes());
        h.finalize()
    }

    /// How many sources contribute bytes to the output range `[start, start + len)`.
    pub fn sources_in(&self, start: u64, len: u64) -> u64 {
        let first = self.ends.partition_point(|&e| e <= start);
        let last = self.ends.partition_point(|&e| e < start + len);
        (last + 1).saturating_sub(first) as u64
    }
}

/// Log each source for the first this many; past that, a job of a million parts would drown
/// its log, so only a summary follows.
const LOGGED_SOURCES: u64 = 10_000;

/// Sources probed at a time, in parallel: opening and `fstat`ing thousands of small files is
/// the whole cost of planning, and it need not wait for the previous file.
const PROBE_BATCH: usize = 1024;

/// Check and measure every source of `manifest`, refusing the job as early as possible: a source
/// that is missing, not allowed, not regular, shorter than its range or its declared `size`, or a
/// total past `max_output_size` (checked as each source arrives) or unequal to `expect.size`.
pub fn build(
    manifest: &Manifest,
    sources: &Sources,
    max_output_size: u64,
) -> Result<Plan, JobError> {
    let mut plan = Plan::default();
    let mut list_pins = Vec::new();
    let mut batch: Vec<(u64, SourceSpec)> = Vec::with_capacity(PROBE_BATCH);
    manifest.for_each_source::<JobError, _, _>(
        |list: &Location| {
            let (reader, pin) = sources
                .open_list(list, None)
                .map_err(|source| JobError::List { source })?;
            list_pins.push(pin);
            Ok(reader)
        },
        |n, spec| {
            batch.push((n, spec.clone()));
            if batch.len() == PROBE_BATCH {
                plan.add_batch(&mut batch, sources, max_output_size)?;
            }
            Ok(())
        },
    )?;
    plan.add_batch(&mut batch, sources, max_output_size)?;
    plan.list_pins = list_pins;
    if plan.count() == 0 {
        return Err(JobError::Manifest(
            crate::manifest::ManifestError::Invalid {
                path: manifest.path.clone(),
                message: "no sources: the source lists are empty".into(),
            },
        ));
    }
    if plan.count() > LOGGED_SOURCES {
        tracing::info!(
            sources = plan.count(),
            "… and more sources planned (not logged one by one)"
        );
    }
    if let Some(want) = manifest.expect.size
        && want != plan.total
    {
        return Err(JobError::SizeMismatch {
            number: None,
            message: format!(
                "expect.size is {want} bytes, the sources add up to {}",
                plan.total
            ),
        });
    }
    Ok(plan)
}

impl Plan {
    /// Probe a batch of sources in parallel, then take them in order (so the first failing
    /// source is the one reported, and `max_output_size` is checked source by source).
    fn add_batch(
        &mut self,
        batch: &mut Vec<(u64, SourceSpec)>,
        sources: &Sources,
        max_output_size: u64,
    ) -> Result<(), JobError> {
        let probes: Vec<_> = batch
            .par_iter()
            .with_min_len(64)
            .map(|(_, spec)| sources.probe(&spec.location))
            .collect();
        for ((n, spec), probe) in batch.drain(..).zip(probes) {
            let probe = probe.map_err(|source| JobError::Source { number: n, source })?;
            self.add(n, &spec, probe, max_output_size)?;
        }
        Ok(())
    }

    fn add(
        &mut self,
        n: u64,
        spec: &SourceSpec,
        probe: Probe,
        max_output_size: u64,
    ) -> Result<(), JobError> {
        let offset = spec.offset.unwrap_or(0);
        let mismatch = |message: String| JobError::SizeMismatch {
            number: Some(n),
            message: format!("source {n} ({}): {message}", spec.location),
        };
        if offset > probe.size {
            return Err(mismatch(format!(
                "offset {offset} is past its end ({} bytes)",
                probe.size
            )));
        }
        let len = match spec.length {
            Some(l) if offset.checked_add(l).is_none_or(|end| end > probe.size) => {
                return Err(mismatch(format!(
                    "range {offset}+{l} is past its end ({} bytes)",
                    probe.size
                )));
            }
            Some(l) => l,
            None => probe.size - offset,
        };
        if let Some(want) = spec.size
            && want != len
        {
            return Err(mismatch(format!("expected {want} bytes, found {len}")));
        }
        self.total = self.total.saturating_add(len);
        if self.total > max_output_size {
            return Err(JobError::TooLarge {
                message: format!(
                    "the output reaches {} bytes at source {n} ({}); max_output_size is {max_output_size}",
                    self.total, spec.location
                ),
            });
        }
        if n <= LOGGED_SOURCES {
            tracing::info!(source = n, location = %spec.location, bytes = len, "source planned");
        }
        self.source_hashes |= spec.blake3.is_some();
        self.remote |= matches!(spec.location, Location::Url(_));
        self.ends.push(self.total);
        self.pins.push(probe.pin);
        for v in [n, probe.identity, offset, len] {
            self.identity.update(&v.to_le_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_busy_ranges() {
        let plan = Plan {
            total: 10,
            ends: vec![4, 4, 7, 10],
            pins: vec![Pin(0); 4],
            ..Plan::default()
        };
        assert_eq!((plan.start(1), plan.len(1)), (0, 4));
        assert_eq!((plan.start(2), plan.len(2)), (4, 0));
        assert_eq!((plan.start(4), plan.len(4)), (7, 3));
        assert_eq!(plan.sources_in(0, 4), 1);
        assert_eq!(plan.sources_in(0, 10), 4);
        assert_eq!(plan.sources_in(5, 1), 1);
    }
}
