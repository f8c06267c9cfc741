//! One job: a manifest in, a verified output published (or nothing), a [`JobResult`] out.
//!
//! The same code serves `concatd once` and the daemon, in two phases. Planning ([`prepare`]):
//! parse the manifest, check the output location, plan (every source checked and measured,
//! [`plan`]) — all a job decides before its first byte, and all `concatd plan` runs. Running:
//! allocate the temporary output, copy and hash on every core ([`copy`]), check per-source and
//! whole-output checksums, publish. Any failure drops the temporary output, which removes it:
//! nothing appears at the output path.
//! [`JobError::kind`] is the one place where failures become the spec's error kinds.

mod copy;
pub mod parts;
#[cfg(test)]
mod parts_props;
mod pieces;
pub mod plan;
#[cfg(test)]
mod plan_props;
mod table;
pub mod upload;
mod verify;

pub use pieces::{PIECES_JOURNAL, resumable};
pub use plan::{Plan, Planned, Refusals};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{OutputRoot, Rule, WriteMode};
use crate::manifest::{Manifest, ManifestError, Origin};
use crate::output::{OutputError, OutputTarget, Publish, PublishStep, Renames};
use crate::result::{ErrorKind, JobResult, Problem, Published, ResultError, ResultHead, Timing};
use crate::source::{SourceError, Sources};

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("source {number}: {source}")]
    Source {
        number: u64,
        #[source]
        source: SourceError,
    },
    #[error("source list {source}")]
    List {
        #[source]
        source: SourceError,
    },
    /// The rule's sources cannot be set up (an allowed folder vanished, say).
    #[error("{source}")]
    Sources {
        #[source]
        source: SourceError,
    },
    #[error("{message}")]
    SizeMismatch {
        number: Option<u64>,
        message: String,
    },
    #[error("{message}")]
    ChecksumMismatch {
        number: Option<u64>,
        message: String,
    },
    #[error("{message}")]
    TooLarge { message: String },
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The daemon's job journal could not be recorded (nothing was published).
    #[error("recording the job journal: {0}")]
    Journal(#[source] std::io::Error),
    /// A signal (`concatd once`) or the daemon's shutdown stopped the job.
    #[error("cancelled by a signal (SIGINT/SIGTERM): nothing was published")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// The spec's error kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Manifest(_) => ErrorKind::InvalidManifest,
            Self::Source { source, .. } | Self::List { source } | Self::Sources { source } => {
                match source {
                    SourceError::NotAllowed { .. } => ErrorKind::SourceNotAllowed,
                    SourceError::NotFound { .. } => ErrorKind::SourceNotFound,
                    SourceError::NotRegular { .. } => ErrorKind::SourceNotRegular,
                    SourceError::ReadFailed { .. } => ErrorKind::SourceReadFailed,
                    SourceError::Changed { .. } => ErrorKind::SourceChanged,
                    SourceError::Archived { .. } => ErrorKind::SourceArchived,
                    SourceError::SizeChanged { .. } => ErrorKind::SourceChanged,
                    SourceError::Remote { .. }
                    | SourceError::LengthMismatch { .. }
                    | SourceError::S3Setup { .. } => ErrorKind::RemoteFailed,
                    SourceError::Setup { .. } => ErrorKind::Internal,
                    SourceError::Cancelled { .. } => ErrorKind::Cancelled,
                }
            }
            Self::SizeMismatch { .. } => ErrorKind::SizeMismatch,
            Self::ChecksumMismatch { .. } => ErrorKind::ChecksumMismatch,
            Self::TooLarge { .. } => ErrorKind::TooLarge,
            Self::Output(OutputError::NotAllowed { .. }) => ErrorKind::OutputNotAllowed,
            Self::Output(OutputError::Exists { .. }) => ErrorKind::OutputExists,
            Self::Output(OutputError::NoSpace { .. }) => ErrorKind::NoSpace,
            Self::Output(OutputError::Store { .. }) => ErrorKind::RemoteFailed,
            Self::Journal(e) if crate::output::is_no_space(e) => ErrorKind::NoSpace,
            Self::Journal(_) => ErrorKind::Internal,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::Output(OutputError::Io { .. }) | Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// A wait on a source that the cancel flag ended is the job's cancellation, not the source's
    /// fault: one error, whichever step noticed.
    fn cancellation_first(self) -> Self {
        match self {
            Self::Source {
                source: SourceError::Cancelled { .. },
                ..
            }
            | Self::List {
                source: SourceError::Cancelled { .. },
            }
            | Self::Sources {
                source: SourceError::Cancelled { .. },
            } => Self::Cancelled,
            e => e,
        }
    }

    /// The 1-based number of the source at fault, if one is.
    pub fn source_number(&self) -> Option<u64> {
        match self {
            Self::Source { number, .. } => Some(*number),
            Self::SizeMismatch { number, .. } | Self::ChecksumMismatch { number, .. } => *number,
            _ => None,
        }
    }
}

/// Bytes copied so far, for progress bars and logs.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

/// Everything a job needs besides its manifest.
pub struct JobContext<'a> {
    pub rule: &'a Rule,
    pub job_id: String,
    /// Set to abort the job (it then fails with [`JobError::Cancelled`], output removed).
    pub cancel: Option<&'a AtomicBool>,
    pub progress: Option<&'a Progress>,
    /// Called before each durable step of the job ([`JobStep`]): the daemon records it in the
    /// job folder's journal so that recovery after a crash knows where the job was (see
    /// `daemon::recover`). An error fails the job (kind `no_space` for a full disk, else
    /// `internal`) and nothing is published.
    pub before_publish: Option<&'a BeforePublish<'a>>,
    /// Where the copy pass journals finished pieces (`.work/<id>/.pieces` for the daemon), so a
    /// rerun under the same job id after a crash or a shutdown continues where this run stopped
    /// (see [`pieces`]). `None` (`concatd once`): nothing journaled, nothing resumed.
    pub pieces: Option<&'a Path>,
}

/// The hook type of [`JobContext::before_publish`].
pub type BeforePublish<'a> = dyn Fn(&JobStep) -> std::io::Result<()> + Sync + 'a;

/// Where a job is, as its journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The temporary output is being created and filled.
    Copying,
    /// Output and sidecar complete under temporary names, about to be renamed.
    Publishing,
    /// Both renamed into place, durably.
    Published,
}

/// A step of a job about to be taken: handed to [`JobContext::before_publish`].
pub struct JobStep<'a> {
    pub stage: Stage,
    /// The rule's `output_root` and the manifest's `output` beneath it.
    pub output_root: &'a Path,
    pub output: &'a str,
    pub overwrite: bool,
    /// From [`Stage::Publishing`] on: what is about to be renamed.
    pub renames: Option<Renames>,
    pub size: u64,
    pub hash: Option<&'a blake3::Hash>,
    pub sources: u64,
}

impl JobContext<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// What a successful job produced.
enum Outcome {
    Local {
        output: std::path::PathBuf,
        size: u64,
        hash: blake3::Hash,
        sources: u64,
        /// The write mode that ran (`auto` decides per output filesystem).
        mode: WriteMode,
    },
    S3 {
        done: upload::Uploaded,
        size: u64,
        sources: u64,
    },
}

/// A new job id: time-ordered, unique across daemons.
pub fn new_job_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Run the manifest the daemon claimed at `manifest_path` to completion and describe what
/// happened (see [`run_from`]).
pub fn run(ctx: &JobContext, manifest_path: &Path) -> JobResult {
    run_from(ctx, manifest_path, Origin::Claimed)
}

/// Run the manifest at `manifest_path`, reached as `origin` says (which decides whether a link
/// may be followed and how errors name it), to completion and describe what happened.
pub fn run_from(ctx: &JobContext, manifest_path: &Path, origin: Origin) -> JobResult {
    let started = SystemTime::now();
    let clock = Instant::now();
    let mut head = result_head(ctx.rule, &ctx.job_id, manifest_path);
    tracing::info!(job_id = %ctx.job_id, manifest = %head.manifest, "job started");
    let outcome = execute(ctx, manifest_path, origin).map_err(JobError::cancellation_first);
    let timing = Timing {
        started,
        finished: SystemTime::now(),
        duration: clock.elapsed(),
    };
    match outcome {
        Ok(Outcome::Local {
            output,
            size,
            hash,
            sources,
            mode,
        }) => {
            let rate = size as f64 / timing.duration.as_secs_f64().max(1e-9) / (1 << 20) as f64;
            tracing::info!(
                job_id = %ctx.job_id, manifest = %head.manifest, output = %output.display(),
                bytes = size, sources, blake3 = %hash.to_hex(),
                ms = timing.duration.as_millis() as u64, mib_per_s = format!("{rate:.1}"),
                "published"
            );
            let done = Published {
                output: output.display().to_string(),
                size,
                blake3: hash.to_hex().to_string(),
                sources,
            };
            head.write_mode = Some(mode.as_str().to_owned());
            JobResult::published(head, timing, done)
        }
        Ok(Outcome::S3 {
            done,
            size,
            sources,
        }) => upload::result(&ctx.job_id, head, timing, done, size, sources),
        Err(e) => {
            tracing::warn!(
                job_id = %ctx.job_id, manifest = %head.manifest, kind = %e.kind(),
                error = %crate::source::Redacted(&e.to_string()), "failed"
            );
            let error = problem(&head.manifest, &e).into();
            JobResult::failed(head, timing, error)
        }
    }
}

/// The part of a result that names the job.
pub fn result_head(rule: &Rule, job_id: &str, manifest_path: &Path) -> ResultHead {
    ResultHead {
        rule: rule.name.clone(),
        manifest: manifest_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        job_id: job_id.to_owned(),
        // An S3 output writes no local file. A job that publishes says what ran instead.
        write_mode: rule
            .output_root
            .local()
            .map(|_| rule.write_mode.resolve().as_str().to_owned()),
    }
}

/// A failure as a result lists it.
pub fn problem(manifest_name: &str, e: &JobError) -> Problem {
    Problem {
        kind: e.kind(),
        // Sources are named redacted already; this keeps a URL quoted by any other error (a
        // dependency's message, say) from carrying credentials into the result.
        message: crate::source::redact(&format!("{manifest_name}: {e}")).into_owned(),
        source_index: e.source_number(),
    }
}

impl From<Problem> for ResultError {
    fn from(p: Problem) -> Self {
        Self {
            kind: p.kind,
            message: p.message,
            source_index: p.source_index,
            problems: Vec::new(),
        }
    }
}

/// Everything a job decides before its first byte: the planning phase's value, which the running
/// phase takes as it is (so `concatd plan` shows exactly what `once` and the daemon would do).
pub struct Prepared<'a> {
    pub manifest: Manifest,
    /// Where the output lands. `None` only after a [`Phase::Dry`] planning whose output folder
    /// does not exist yet (a run creates it).
    pub target: Option<OutputTarget>,
    /// The output's path (`target`'s, or where it would be).
    pub output: PathBuf,
    /// Whether an existing output may be replaced (the manifest's `overwrite`, else the rule's).
    pub overwrite: bool,
    pub sources: Sources<'a>,
    pub plan: Plan,
    /// An S3 output's object and parts (`None`: a local output).
    pub s3: Option<upload::S3Job>,
}

/// What the planning phase is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before a run: the first refusal ends it, and the output's folders are created.
    Run,
    /// `concatd plan`: every refusal is found, and nothing is created.
    Dry,
}

/// The planning phase: parse the manifest, check the output location, plan every source. No
/// byte is written. With [`Phase::Run`] the first refusal ends it; with [`Phase::Dry`] every
/// refusal found is returned, in order: the output's first, then the sources' in manifest order,
/// then the totals'. `observe` sees each source planned.
pub fn prepare<'a>(
    rule: &Rule,
    job_id: &str,
    manifest_path: &Path,
    origin: Origin,
    phase: Phase,
    cancel: Option<&'a AtomicBool>,
    observe: &mut dyn FnMut(&Planned),
) -> Result<Prepared<'a>, Vec<JobError>> {
    let refusals = match phase {
        Phase::Run => Refusals::First,
        Phase::Dry => Refusals::All,
    };
    let manifest = Manifest::load(manifest_path, origin).map_err(|e| vec![e.into()])?;
    for note in &manifest.notes {
        tracing::info!(job_id = %job_id, "{note}");
    }
    let mut problems: Vec<JobError> = Vec::new();
    let mut refuse = |e: JobError| match refusals {
        Refusals::First => Err(vec![e]),
        Refusals::All => {
            problems.push(e);
            Ok(())
        }
    };
    let overwrite = manifest.overwrite.unwrap_or(rule.overwrite);
    let local_root = match &rule.output_root {
        OutputRoot::Local(root) => root.as_path(),
        OutputRoot::S3(root) => {
            return upload::prepare(
                rule, job_id, root, manifest, overwrite, refusals, cancel, observe,
            );
        }
    };
    let target = match phase {
        Phase::Run => OutputTarget::new(local_root, &manifest.output).map(Some),
        Phase::Dry => OutputTarget::existing_folder(local_root, &manifest.output),
    };
    let target = match target {
        Ok(target) => {
            if !overwrite
                && let Some(path) = target.as_ref().and_then(|t| t.existing(rule.checksum_file))
            {
                refuse(OutputError::Exists { path }.into())?;
            }
            if overwrite && let Some(path) = target.as_ref().and_then(|t| t.folder_in_the_way()) {
                refuse(
                    OutputError::NotAllowed {
                        output: manifest.output.escape_debug().to_string(),
                        reason: format!(
                            "{} is a folder, and overwrite replaces files only",
                            path.display()
                        ),
                    }
                    .into(),
                )?;
            }
            target
        }
        Err(e) => {
            refuse(e.into())?;
            None
        }
    };
    let output = match &target {
        Some(t) => t.path().to_path_buf(),
        None => local_root.join(&manifest.output),
    };
    let sources = match Sources::with_cancel(rule, cancel) {
        Ok(sources) => sources,
        Err(source) => {
            problems.push(JobError::Sources { source });
            return Err(problems);
        }
    };
    let plan = plan::build(
        &manifest,
        &sources,
        rule.max_output_size,
        refusals,
        Some(local_root),
        observe,
    );
    match plan {
        Ok(plan) if problems.is_empty() => {
            tracing::info!(
                job_id = %job_id, sources = plan.count(), bytes = plan.total,
                output = %output.display(), "planned"
            );
            Ok(Prepared {
                manifest,
                target,
                output,
                overwrite,
                sources,
                plan,
                s3: None,
            })
        }
        plan => {
            problems.extend(plan.err().into_iter().flatten());
            Err(problems)
        }
    }
}

/// A long copy says how far it is this often (one line: a job's log stays short whatever its
/// size, see the README's "Logs").
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Run `copy`, logging its progress every [`PROGRESS_EVERY`] until it returns.
fn progress_logged<T>(ctx: &JobContext, total: u64, copy: impl FnOnce() -> T) -> T {
    let Some(progress) = ctx.progress else {
        return copy();
    };
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let span = tracing::Span::current();
    let span = &span;
    std::thread::scope(|s| {
        s.spawn(move || {
            span.in_scope(|| {
                let clock = Instant::now();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PROGRESS_EVERY) {
                    let done = progress.done.load(Ordering::Relaxed);
                    let rate = done as f64 / clock.elapsed().as_secs_f64() / (1 << 20) as f64;
                    tracing::info!(
                        job_id = %ctx.job_id, bytes = done, total,
                        percent = format!("{:.1}", done as f64 * 100.0 / total.max(1) as f64),
                        mib_per_s = format!("{rate:.1}"), "copying"
                    );
                }
            })
        });
        let out = copy();
        drop(stop);
        out
    })
}

/// How the running phase would copy a prepared job.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Copy threads (for remote sources: requests in flight).
    pub workers: usize,
    /// Largest piece of output copied and hashed as a unit.
    pub piece_size: u64,
    pub pieces: u64,
    /// The write mode the rule resolves to (`auto` is `copy_file_range`; `mmap` falls back to
    /// `pwrite` where the output's filesystem cannot allocate, which only creating the file finds
    /// out).
    pub write_mode: WriteMode,
}

impl Prepared<'_> {
    /// How [`run`] would copy this job under `rule`.
    pub fn layout(&self, rule: &Rule) -> Layout {
        let (workers, piece_size) = copy_settings(rule, &self.plan);
        Layout {
            workers,
            piece_size,
            pieces: copy::piece_count(&self.plan, piece_size),
            write_mode: rule.write_mode.resolve(),
        }
    }
}

/// Workers and piece size of a job's copy pass. Remote sources: as many workers as ranged
/// requests wanted in flight, and pieces of the configured chunk size (one request each);
/// local-only jobs keep the measured defaults.
fn copy_settings(rule: &Rule, plan: &Plan) -> (usize, u64) {
    if plan.remote {
        (rule.remote.parallel, rule.remote.chunk_size)
    } else {
        (copy::default_workers(), copy::MAX_PIECE)
    }
}

fn execute(ctx: &JobContext, manifest_path: &Path, origin: Origin) -> Result<Outcome, JobError> {
    // Progress is always counted: the copy's crash point `mid-copy` is a fraction of it.
    let counted = Progress::default();
    let ctx = &JobContext {
        rule: ctx.rule,
        job_id: ctx.job_id.clone(),
        cancel: ctx.cancel,
        progress: Some(ctx.progress.unwrap_or(&counted)),
        before_publish: ctx.before_publish,
        pieces: ctx.pieces,
    };
    let rule = ctx.rule;
    let Prepared {
        manifest,
        target,
        overwrite,
        sources,
        mut plan,
        s3,
        ..
    } = prepare(
        rule,
        &ctx.job_id,
        manifest_path,
        origin,
        Phase::Run,
        ctx.cancel,
        &mut |_| {},
    )
    .map_err(|mut problems| problems.swap_remove(0))?;
    if let Some(p) = ctx.progress {
        p.total.store(plan.total, Ordering::Relaxed);
    }
    if ctx.cancelled() {
        return Err(JobError::Cancelled);
    }
    if let Some(job) = &s3 {
        let done = upload::run(ctx, job, &plan, &manifest, &sources, overwrite)?;
        return Ok(Outcome::S3 {
            done,
            size: plan.total,
            sources: plan.count(),
        });
    }
    let target = target.ok_or_else(|| JobError::Internal("no output target".into()))?;
    let local_root = rule
        .output_root
        .local()
        .ok_or_else(|| JobError::Internal("a local output under an S3 root".into()))?;
    let (plan_total, plan_count) = (plan.total, plan.count());
    let step = |stage, renames, hash| JobStep {
        stage,
        output_root: local_root,
        output: &manifest.output,
        overwrite,
        renames,
        size: plan_total,
        hash,
        sources: plan_count,
    };
    let record = |step: &JobStep| match ctx.before_publish {
        Some(hook) => hook(step).map_err(JobError::Journal),
        None => Ok(()),
    };
    // Recorded before the temporary file exists, so recovery always knows where to look for it.
    record(&step(Stage::Copying, None, None))?;
    let (workers, max_piece) = copy_settings(rule, &plan);
    let configured_mode = rule.write_mode.resolve();
    // Where extents may be shared with the sources, the shared ranges need no blocks of their own.
    let allocate = match rule.write_mode {
        WriteMode::Auto | WriteMode::CopyFileRange => crate::output::Allocate::UnlessShared,
        WriteMode::Pwrite | WriteMode::Mmap => crate::output::Allocate::Full,
    };
    let fingerprint = copy::fingerprint(&plan, max_piece, configured_mode);
    let create = || match ctx.pieces {
        Some(path) if plan_total > 0 => pieces::start(
            path,
            &fingerprint,
            &target,
            &ctx.job_id,
            plan_total,
            rule.fsync,
            allocate,
        ),
        _ => target
            .create_temp_with(&ctx.job_id, plan_total, allocate)
            .map(|temp| (temp, None, Vec::new())),
    };
    let (temp, journal, resumed) = match create() {
        // The plan's spilled table may hold the room the output needs: take it back into memory
        // and try once more.
        Err(OutputError::NoSpace { .. }) if plan.unspill() => {
            tracing::info!(
                job_id = %ctx.job_id,
                "no room for the output beside the plan's spilled table: table moved to memory"
            );
            create()?
        }
        r => r?,
    };
    let journaled = journal.is_some();
    let mut mode = configured_mode;
    // `copy_file_range` (and so `auto`) shares extents where the output's filesystem can (see
    // copy::Copy::place); only those modes leave the shared ranges unallocated.
    let share = temp.reflinks() && allocate == crate::output::Allocate::UnlessShared;
    if mode == crate::config::WriteMode::Mmap && !temp.allocated() {
        // Without allocated blocks a full disk would reach a mapped write as SIGBUS.
        tracing::warn!(job_id = %ctx.job_id, "filesystem cannot fallocate: using pwrite, not mmap");
        mode = crate::config::WriteMode::Pwrite;
    }
    let copy = copy::Copy {
        plan: &plan,
        workers,
        max_piece,
        manifest: &manifest,
        sources: &sources,
        out: temp.file(),
        out_path: target.path(),
        mode,
        share,
        ctx,
        journal: std::sync::Mutex::new(journal),
        resumed,
    };
    let hash = match progress_logged(ctx, plan.total, || copy.run())
        .map_err(JobError::cancellation_first)
    {
        Ok(hash) => hash,
        // A shutdown: the job stays claimed and reruns at the next start, resuming from the
        // pieces journaled so far, so keep the bytes they describe.
        Err(JobError::Cancelled) if journaled => {
            temp.keep();
            return Err(JobError::Cancelled);
        }
        Err(e) => return Err(e),
    };
    if plan.source_hashes {
        verify::source_hashes(&plan, &manifest, &sources, temp.file())?;
    }
    if let Some(want) = manifest.expect.blake3
        && want != hash
    {
        return Err(JobError::ChecksumMismatch {
            number: None,
            message: format!(
                "expect.blake3 is {}, the output hashes to {}",
                want.to_hex(),
                hash.to_hex()
            ),
        });
    }
    if ctx.cancelled() {
        return Err(JobError::Cancelled);
    }
    let mut renamed = None;
    let output = temp.publish(
        &hash,
        Publish {
            overwrite,
            fsync: rule.fsync,
            sidecar: rule.checksum_file,
        },
        |publish| {
            let stage = match publish {
                PublishStep::Publishing(r) => {
                    renamed = Some(r);
                    Stage::Publishing
                }
                PublishStep::Published => Stage::Published,
            };
            record(&step(stage, renamed, Some(&hash)))
        },
    )?;
    Ok(Outcome::Local {
        output,
        size: plan.total,
        hash,
        sources: plan.count(),
        mode,
    })
}
