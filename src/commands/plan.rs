//! `concatd plan`: the planning phase of a job ([`job::prepare`], the very code `once` and the
//! daemon run first) and nothing else: what the job would write where, made of which bytes, or
//! every reason it would be refused. No byte is written and no file created.
//!
//! The JSON document (`--json`), fields may be added:
//! ```text
//! {"status": "planned", "rule", "manifest", "output": "/abs/path", "overwrite": false,
//!  "checksum_file": true, "fsync": true, "size": N, "source_count": N, "write_mode": "copy_file_range",
//!  "sources": [{"number": 1, "location": "a.bin" (as written, credentials redacted),
//!               "resolved": "/srv/data/a.bin" (local: the file opened, symlinks followed),
//!               "output_offset", "offset", "length" (the range taken), "object_size",
//!               "pin": {"kind": "local", "dev", "ino", "size", "mtime"}
//!                    | {"kind": "remote", "size", "etag", "last_modified", "version_id"}}, …],
//!  "parts": {"target": "local_file", "count", "piece_size", "workers",
//!            "bytes_through_host", "copied_bytes": 0}}
//! ```
//! `parts` is where an output's physical layout goes. A local output is one temporary file
//! filled in `count` pieces (hashed as BLAKE3 subtrees), every byte through this host. An S3
//! output is `{"target": "s3_multipart", "count", "bytes_through_host", "copied_bytes",
//! "crc64nvme_known", "blake3_known", "items": [{"number", "op": "copy" | "upload",
//! "output_offset", "length", "sources": [{"number", "offset", "length"}],
//! "bytes_through_host"}]}`: the same totals, plus every part of the multipart upload, decided
//! before its first byte (a copy part has one source, the object range the store copies).
//!
//! Refused: exit 1 and a failed result whose `error.problems` lists every refusal (the output's,
//! each source's with its number, the totals'); `error` itself is the first of them.

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use super::{init_stderr_logging, load_rule};
use crate::job::{self, Phase, Planned};
use crate::manifest::Location;
use crate::result::{JobResult, ResultError, Timing};
use crate::source::{Pin, PinDetail};

pub fn run(config: &Path, rule_name: &str, manifest: &Path, as_json: bool) -> anyhow::Result<i32> {
    init_stderr_logging("warn");
    let rule = match load_rule(config, rule_name) {
        Ok(rule) => rule,
        Err(code) => return Ok(code),
    };
    let started = SystemTime::now();
    let job_id = job::new_job_id();
    let head = job::result_head(&rule, &job_id, manifest);
    let mut rows = Vec::new();
    let mut observe = |p: &Planned| {
        rows.push(Row {
            number: p.number,
            location: p.spec.location.clone(),
            output_offset: p.output_offset,
            offset: p.offset,
            length: p.len,
            object_size: p.probe.size,
            pin: p.probe.pin,
        })
    };
    let prepared = job::prepare(
        &rule,
        &job_id,
        manifest,
        crate::manifest::Origin::Given,
        Phase::Dry,
        None,
        &mut observe,
    );
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(problems) => {
            let problems = problems
                .iter()
                .map(|e| job::problem(&head.manifest, e))
                .collect();
            let error = ResultError::from_problems(problems).expect("a refusal has a problem");
            let result = JobResult::failed(head, Timing::until_now(started), error);
            if as_json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print_refused(&result);
            }
            return Ok(1);
        }
    };
    let layout = prepared.layout(&rule);
    let sources = rows
        .iter()
        .map(|row| {
            let detail = prepared.sources.describe(&row.location, row.pin);
            SourceJson {
                number: row.number,
                location: row.location.to_string(),
                resolved: match &detail {
                    Some(PinDetail::Local(l)) => Some(l.resolved.display().to_string()),
                    _ => None,
                },
                output_offset: row.output_offset,
                offset: row.offset,
                length: row.length,
                object_size: row.object_size,
                pin: detail.map(PinJson::from),
            }
        })
        .collect();
    let total = prepared.plan.total;
    let parts = match &prepared.s3 {
        None => Parts::LocalFile {
            count: layout.pieces,
            piece_size: layout.piece_size,
            workers: layout.workers,
            bytes_through_host: total,
            copied_bytes: 0,
        },
        Some(job) => s3_parts(job, &rule, &prepared),
    };
    let doc = PlanJson {
        status: "planned",
        rule: head.rule,
        manifest: head.manifest,
        job_id: head.job_id,
        output: prepared.output.display().to_string(),
        overwrite: prepared.overwrite,
        checksum_file: rule.checksum_file,
        fsync: rule.fsync,
        size: total,
        source_count: prepared.plan.count(),
        write_mode: if prepared.s3.is_some() {
            "s3_multipart"
        } else {
            layout.write_mode.as_str()
        },
        sources,
        parts,
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&doc);
    }
    Ok(0)
}

/// One planned source, as the observer saw it.
struct Row {
    number: u64,
    location: Location,
    output_offset: u64,
    offset: u64,
    length: u64,
    object_size: u64,
    pin: Pin,
}

#[derive(Serialize)]
struct PlanJson {
    status: &'static str,
    rule: String,
    manifest: String,
    job_id: String,
    output: String,
    overwrite: bool,
    checksum_file: bool,
    fsync: bool,
    size: u64,
    source_count: u64,
    write_mode: &'static str,
    sources: Vec<SourceJson>,
    parts: Parts,
}

#[derive(Serialize)]
struct SourceJson {
    number: u64,
    location: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved: Option<String>,
    output_offset: u64,
    offset: u64,
    length: u64,
    object_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pin: Option<PinJson>,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum PinJson {
    Local {
        dev: u64,
        ino: u64,
        size: u64,
        /// RFC 3339 with nanoseconds, UTC.
        mtime: String,
    },
    Remote {
        size: u64,
        etag: Option<String>,
        last_modified: Option<String>,
        version_id: Option<String>,
    },
}

impl From<PinDetail> for PinJson {
    fn from(d: PinDetail) -> Self {
        match d {
            PinDetail::Local(l) => Self::Local {
                dev: l.dev,
                ino: l.ino,
                size: l.size,
                mtime: humantime::format_rfc3339_nanos(l.mtime).to_string(),
            },
            PinDetail::Remote(v) => Self::Remote {
                size: v.size,
                etag: v.etag.clone(),
                last_modified: v.last_modified.clone(),
                version_id: v.version_id.clone(),
            },
        }
    }
}

/// The output's physical layout (see the module's documentation for the S3 form to come).
#[derive(Serialize)]
#[serde(tag = "target", rename_all = "snake_case")]
enum Parts {
    LocalFile {
        count: u64,
        piece_size: u64,
        workers: usize,
        bytes_through_host: u64,
        copied_bytes: u64,
    },
    S3Multipart {
        count: usize,
        bytes_through_host: u64,
        copied_bytes: u64,
        /// The full-object CRC64NVME will be known (and checked by the store).
        crc64nvme_known: bool,
        /// The output's BLAKE3 will be known (every byte passes, or `verify: read_back`).
        blake3_known: bool,
        items: Vec<PartJson>,
    },
}

#[derive(Serialize)]
struct PartJson {
    number: u32,
    op: &'static str,
    output_offset: u64,
    length: u64,
    sources: Vec<PartSource>,
    bytes_through_host: u64,
}

#[derive(Serialize)]
struct PartSource {
    number: u64,
    /// Offset in the source object (not in the output).
    offset: u64,
    length: u64,
}

fn s3_parts(job: &job::upload::S3Job, rule: &crate::config::Rule, p: &job::Prepared) -> Parts {
    let blake3_known = rule.verify == crate::config::Verify::ReadBack
        || p.manifest.expect.blake3.is_some()
        || job.parts.uploaded_bytes == p.plan.total;
    let items = job
        .parts
        .parts
        .iter()
        .map(|part| {
            let copy = matches!(part.kind, job::parts::PartKind::Copy { .. });
            PartJson {
                number: part.number,
                op: if copy { "copy" } else { "upload" },
                output_offset: part.start,
                length: part.len,
                sources: job
                    .sources_in(part.start, part.len)
                    .into_iter()
                    .map(|(i, offset, length)| PartSource {
                        number: job.recs[i].number,
                        offset,
                        length,
                    })
                    .collect(),
                bytes_through_host: if copy { 0 } else { part.len },
            }
        })
        .collect();
    Parts::S3Multipart {
        count: job.parts.parts.len(),
        bytes_through_host: job.parts.uploaded_bytes,
        copied_bytes: job.parts.copied_bytes,
        crc64nvme_known: job.crc_knowable(),
        blake3_known,
        items,
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn print_table(doc: &PlanJson) {
    println!("plan of {} (rule {}): would run", doc.manifest, doc.rule);
    println!(
        "output      {} (overwrite: {}, checksum file: {}, fsync: {})",
        doc.output,
        yes(doc.overwrite),
        yes(doc.checksum_file),
        yes(doc.fsync)
    );
    println!(
        "size        {} bytes from {} sources",
        doc.size, doc.source_count
    );
    match &doc.parts {
        Parts::LocalFile {
            count,
            piece_size,
            workers,
            ..
        } => println!(
            "write       {}: {count} pieces of at most {piece_size} bytes, {workers} workers",
            doc.write_mode
        ),
        Parts::S3Multipart {
            count,
            bytes_through_host,
            copied_bytes,
            crc64nvme_known,
            blake3_known,
            items,
        } => {
            println!(
                "upload      {count} parts: {copied_bytes} bytes copied in the store, \
                 {bytes_through_host} bytes through this host (crc64nvme: {}, blake3: {})",
                if *crc64nvme_known { "known" } else { "unknown" },
                if *blake3_known { "known" } else { "unknown" },
            );
            println!();
            println!(
                "{:>6}  {:<6}  {:>14}  {:>12}  {:>12}  sources (number:offset+length)",
                "part", "op", "output offset", "length", "via host"
            );
            for it in items {
                let srcs: Vec<String> = it
                    .sources
                    .iter()
                    .map(|s| format!("{}:{}+{}", s.number, s.offset, s.length))
                    .collect();
                println!(
                    "{:>6}  {:<6}  {:>14}  {:>12}  {:>12}  {}",
                    it.number,
                    it.op,
                    it.output_offset,
                    it.length,
                    it.bytes_through_host,
                    srcs.join(" ")
                );
            }
        }
    }
    println!();
    println!(
        "{:>8}  {:>14}  {:>12}  {:>12}  {:>12}  source",
        "#", "output offset", "length", "offset", "object size"
    );
    for s in &doc.sources {
        let place = match &s.resolved {
            Some(r) if *r != s.location => format!("{} -> {r}", s.location),
            _ => s.location.clone(),
        };
        println!(
            "{:>8}  {:>14}  {:>12}  {:>12}  {:>12}  {place}",
            s.number, s.output_offset, s.length, s.offset, s.object_size
        );
    }
}

fn print_refused(result: &JobResult) {
    let Some(error) = &result.error else { return };
    println!(
        "plan of {} (rule {}): would be refused, {} problem(s):",
        result.manifest,
        result.rule,
        error.problems.len()
    );
    for p in &error.problems {
        println!("  {:<20} {}", p.kind.as_str(), p.message);
    }
}
