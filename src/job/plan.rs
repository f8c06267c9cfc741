//! The planning pass: every source checked and measured before any byte is written.
//!
//! The plan keeps 16 bytes per source — where it ends in the output and the [`Pin`] it was seen
//! with — and nothing else: paths and ranges are streamed from the manifest again by the copy
//! pass, so a job never holds its items whatever its paths. Past 65,536 sources that table
//! spills to an anonymous file beside the output (see [`table`](super::table)), so the
//! process's memory stays flat whatever the number of parts.

use rayon::prelude::*;

use super::JobError;
use super::table::SourceTable;
use crate::manifest::{Location, Manifest, SourceSpec};
use crate::source::{Pin, Probe, Sources};

/// Sizes, offsets and identities of a job's sources.
#[derive(Debug, Default)]
pub struct Plan {
    /// Output size in bytes.
    pub total: u64,
    /// End offset in the output and pin of source `n` at entry `n - 1`.
    table: SourceTable,
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
    /// Move a spilled table back into memory, freeing its file's space on the output's
    /// filesystem; false when it was not spilled (see [`SourceTable::unspill`]).
    pub(super) fn unspill(&mut self) -> bool {
        self.table.unspill()
    }

    /// Number of sources.
    pub fn count(&self) -> u64 {
        self.table.len()
    }

    /// Output offset where source `n` (1-based) starts.
    pub fn start(&self, n: u64) -> u64 {
        if n <= 1 { 0 } else { self.table.end(n - 2) }
    }

    /// Bytes source `n` contributes.
    pub fn len(&self, n: u64) -> u64 {
        self.table.end(n - 1) - self.start(n)
    }

    pub fn pin(&self, n: u64) -> Pin {
        self.table.get(n - 1).1
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
        let first = self.table.partition_point(|e| e <= start);
        let last = self.table.partition_point(|e| e < start + len);
        (last + 1).saturating_sub(first)
    }
}

/// Sources probed at a time, in parallel: opening and `fstat`ing thousands of small files is
/// the whole cost of planning, and it need not wait for the previous file.
const PROBE_BATCH: usize = 1024;

/// How the planner treats a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusals {
    /// Stop at the first (a run: nothing more is worth probing once the job cannot succeed).
    First,
    /// Probe on and report every one (`concatd plan`).
    All,
}

/// One source as the planner took it, handed to the observer of [`build`].
pub struct Planned<'a> {
    /// 1-based, in manifest order.
    pub number: u64,
    pub spec: &'a SourceSpec,
    pub probe: &'a Probe,
    /// Where its bytes start in the output.
    pub output_offset: u64,
    /// Start of the range taken of the source, and its length.
    pub offset: u64,
    pub len: u64,
}

/// Check and measure every source of `manifest`: a source that is missing, not allowed, not
/// regular, shorter than its range or its declared `size`, a total past `max_output_size` or
/// unequal to `expect.size` is a refusal. With [`Refusals::First`] the first refusal ends the
/// pass (and `max_output_size` is checked as each source arrives); with [`Refusals::All`] every
/// source is probed and every refusal returned, in manifest order (a source list that cannot be
/// opened or parsed still ends the pass: the numbers of the sources after it are unknown).
/// `observe` sees each source that was planned, in order. A large plan's table spills into
/// `spill` (the output's folder: see [`table`](super::table)).
pub fn build(
    manifest: &Manifest,
    sources: &Sources,
    max_output_size: u64,
    refusals: Refusals,
    spill: Option<&std::path::Path>,
    observe: &mut dyn FnMut(&Planned),
) -> Result<Plan, Vec<JobError>> {
    let mut plan = Plan {
        table: SourceTable::new(spill),
        ..Plan::default()
    };
    let mut list_pins = Vec::new();
    let mut problems = Vec::new();
    let mut batch: Vec<(u64, SourceSpec)> = Vec::with_capacity(PROBE_BATCH);
    let mut pass = Pass {
        sources,
        max_output_size,
        refusals,
        problems: &mut problems,
        observe,
    };
    let walked = manifest.for_each_source::<JobError, _, _>(
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
                plan.add_batch(&mut batch, &mut pass)?;
            }
            Ok(())
        },
    );
    let walked = walked.and_then(|_| plan.add_batch(&mut batch, &mut pass));
    if let Err(e) = walked {
        // Stopped: the first refusal (Refusals::First) or an unreadable list.
        problems.push(e);
        return Err(problems);
    }
    plan.list_pins = list_pins;
    if let Err(e) = plan.table.seal() {
        problems.push(JobError::Internal(format!(
            "cannot read back the plan's table of sources: {e}"
        )));
        return Err(problems);
    }
    if plan.count() == 0 && problems.is_empty() {
        problems.push(JobError::Manifest(
            crate::manifest::ManifestError::Invalid {
                path: manifest.path.clone(),
                message: "no sources: the source lists are empty".into(),
            },
        ));
        return Err(problems);
    }
    // The sum only grows with the sources not measured, so past the limit is past it; but with
    // one unmeasured, it is no answer to `expect.size`.
    let measured = problems.is_empty();
    if refusals == Refusals::All && plan.total > max_output_size {
        problems.push(JobError::TooLarge {
            message: format!(
                "the output would be {} bytes; max_output_size is {max_output_size}",
                plan.total
            ),
        });
    }
    if let Some(want) = manifest.expect.size
        && want != plan.total
        && measured
    {
        problems.push(JobError::SizeMismatch {
            number: None,
            message: format!(
                "expect.size is {want} bytes, the sources add up to {}",
                plan.total
            ),
        });
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

/// What one planning pass carries from batch to batch.
struct Pass<'a, 'o> {
    sources: &'a Sources<'a>,
    max_output_size: u64,
    refusals: Refusals,
    problems: &'a mut Vec<JobError>,
    observe: &'a mut (dyn FnMut(&Planned) + 'o),
}

impl Pass<'_, '_> {
    /// A refusal: the error that ends the pass, or one noted and passed over.
    fn refuse(&mut self, e: JobError) -> Result<(), JobError> {
        match self.refusals {
            Refusals::First => Err(e),
            Refusals::All => {
                self.problems.push(e);
                Ok(())
            }
        }
    }
}

impl Plan {
    /// Probe a batch of sources in parallel, then take them in order (so the first failing
    /// source is the one reported, and `max_output_size` is checked source by source).
    fn add_batch(
        &mut self,
        batch: &mut Vec<(u64, SourceSpec)>,
        pass: &mut Pass,
    ) -> Result<(), JobError> {
        let sources = pass.sources;
        let probes: Vec<_> = batch
            .par_iter()
            .with_min_len(64)
            .map(|(_, spec)| sources.probe(&spec.location))
            .collect();
        for ((n, spec), probe) in batch.drain(..).zip(probes) {
            match probe {
                Ok(probe) => {
                    if let Err(e) = self.add(n, &spec, probe, pass) {
                        pass.refuse(e)?;
                    }
                }
                Err(source) => pass.refuse(JobError::Source { number: n, source })?,
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        n: u64,
        spec: &SourceSpec,
        probe: Probe,
        pass: &mut Pass,
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
        let start = self.total;
        self.total = self.total.saturating_add(len);
        if pass.refusals == Refusals::First && self.total > pass.max_output_size {
            return Err(JobError::TooLarge {
                message: format!(
                    "the output reaches {} bytes at source {n} ({}); max_output_size is {}",
                    self.total, spec.location, pass.max_output_size
                ),
            });
        }
        // Per source only at debug level: a job of 50,000 parts would drown its log.
        tracing::debug!(source = n, location = %spec.location, offset, bytes = len, "source planned");
        self.source_hashes |= spec.blake3.is_some();
        self.remote |= matches!(spec.location, Location::Url(_));
        self.table.push(self.total, probe.pin);
        for v in [n, probe.identity, offset, len] {
            self.identity.update(&v.to_le_bytes());
        }
        (pass.observe)(&Planned {
            number: n,
            spec,
            probe: &probe,
            output_offset: start,
            offset,
            len,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_busy_ranges() {
        let mut table = SourceTable::new(None);
        for end in [4, 4, 7, 10] {
            table.push(end, Pin(0));
        }
        table.seal().unwrap();
        let plan = Plan {
            total: 10,
            table,
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
