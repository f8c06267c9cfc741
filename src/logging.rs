//! Logging of the daemon: its own log on stderr, and one file per rule.
//!
//! Per-rule files come from a small "sifting" [`Layer`]: a span opened with a `rule` field marks
//! everything inside it (the job's own `tracing` events included) as belonging to that rule, and
//! each such event becomes one line in `<log_dir>/<rule>.log`. (Per-layer filters combined with
//! `reload` panic, tokio-rs/tracing#1629, hence one layer that looks writers up in a map that is
//! swapped on reload.)
//!
//! `<log_dir>/<rule>.log` is always the live file, so `tail -F` and `concatd logs -f` work: at
//! rotation [`RuleFile`] renames it to `<rule>.log.<period>` (`2026-11-25`, or `2026-11-25T19`
//! hourly, UTC) and starts a new one, keeping the newest `log_keep` rotated files. Lines are
//! handed to a non-lossy `tracing_appender::non_blocking` writer, so a slow disk never blocks a
//! job and no line is dropped; its guard is kept for as long as the rule's writer may be used.
//!
//! Every field value is escaped ([`escape`]) in the rule files and on stderr alike, so a name that
//! holds a newline or a terminal sequence can neither forge a line nor drive a terminal.

mod escape;
mod tail;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{Rotation, Rules};
use escape::{Escaped, push_escaped};
pub use escape::{EscapedFields, escape};
pub use tail::print_tail;

/// The live log file of `rule` in `log_dir`.
pub fn rule_log_path(log_dir: &Path, rule: &str) -> PathBuf {
    log_dir.join(format!("{rule}.log"))
}

/// The rotation period a moment belongs to, as the suffix of rotated files (`None`: never).
fn period(rotation: Rotation, t: SystemTime) -> Option<String> {
    let stamp = humantime::format_rfc3339_seconds(t).to_string(); // 2026-11-25T19:45:32Z
    match rotation {
        Rotation::Daily => Some(stamp[..10].to_owned()),
        Rotation::Hourly => Some(stamp[..13].to_owned()),
        Rotation::Never => None,
    }
}

/// One rule's log file, rotated by renaming.
pub struct RuleFile {
    dir: PathBuf,
    name: String,
    rotation: Rotation,
    keep: usize,
    file: File,
    period: Option<String>,
}

impl RuleFile {
    /// Open (append) `<dir>/<name>.log`; a file left from an earlier period is rotated first.
    pub fn open(dir: &Path, name: &str, rotation: Rotation, keep: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = rule_log_path(dir, name);
        let mut me = Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            rotation,
            keep,
            file: OpenOptions::new().create(true).append(true).open(&path)?,
            period: None,
        };
        let mtime = me
            .file
            .metadata()?
            .modified()
            .unwrap_or_else(|_| SystemTime::now());
        me.period = period(rotation, mtime);
        me.rotate_if_due()?;
        Ok(me)
    }

    fn rotate_if_due(&mut self) -> std::io::Result<()> {
        let now = period(self.rotation, SystemTime::now());
        if now == self.period {
            return Ok(());
        }
        let live = rule_log_path(&self.dir, &self.name);
        if let Some(old) = &self.period
            && self.file.metadata()?.len() > 0
        {
            let mut rotated = self.dir.join(format!("{}.log.{old}", self.name));
            let mut n = 1;
            while rotated.exists() {
                rotated = self.dir.join(format!("{}.log.{old}.{n}", self.name));
                n += 1;
            }
            std::fs::rename(&live, &rotated)?;
            self.file = OpenOptions::new().create(true).append(true).open(&live)?;
            self.prune();
        }
        self.period = now;
        Ok(())
    }

    /// Remove the oldest rotated files beyond `keep`.
    fn prune(&self) {
        let prefix = format!("{}.log.", self.name);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut rotated: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        rotated.sort(); // the period suffix sorts by time
        let excess = rotated.len().saturating_sub(self.keep);
        for name in &rotated[..excess] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }
}

impl Write for RuleFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A failed rotation must not lose the line: keep writing to the current file.
        let _ = self.rotate_if_due();
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

struct Writer {
    key: (PathBuf, Rotation, usize),
    out: NonBlocking,
    _guard: WorkerGuard,
}

/// The per-rule writers, shared by the layer and the daemon (which swaps them on reload).
#[derive(Clone, Default)]
pub struct RuleLogs {
    writers: Arc<RwLock<HashMap<String, Arc<Writer>>>>,
}

impl RuleLogs {
    /// Open writers for every rule of `rules`. Writers whose settings did not change are kept;
    /// those of rules no longer present are kept too, because their running jobs still log.
    pub fn configure(&self, rules: &Rules) -> std::io::Result<()> {
        let mut fresh = HashMap::new();
        {
            let current = self.writers.read().expect("log map lock");
            for rule in &rules.rules {
                let key = (rules.log_dir.clone(), rules.log_rotation, rules.log_keep);
                if let Some(w) = current.get(&rule.name).filter(|w| w.key == key) {
                    fresh.insert(rule.name.clone(), w.clone());
                    continue;
                }
                let file = RuleFile::open(&key.0, &rule.name, key.1, key.2)?;
                let (out, guard) = NonBlockingBuilder::default()
                    .lossy(false)
                    .thread_name("concatd-log")
                    .finish(file);
                fresh.insert(
                    rule.name.clone(),
                    Arc::new(Writer {
                        key,
                        out,
                        _guard: guard,
                    }),
                );
            }
        }
        let mut map = self.writers.write().expect("log map lock");
        for (name, w) in fresh {
            map.insert(name, w);
        }
        Ok(())
    }

    /// Flush and close every writer (at exit: the guards wait for queued lines).
    pub fn close(&self) {
        self.writers.write().expect("log map lock").clear();
    }

    fn write_line(&self, rule: &str, line: &str) {
        let writer = self
            .writers
            .read()
            .expect("log map lock")
            .get(rule)
            .cloned();
        if let Some(w) = writer {
            // A clone is a handle to the same worker queue.
            let _ = w.out.clone().write_all(line.as_bytes());
        }
    }
}

/// What the layer keeps of a span: the rule it names, and its other fields (`job_id`,
/// `manifest`), added to every line logged inside it that does not carry them itself.
struct SpanFields {
    rule: Option<String>,
    fields: Vec<(&'static str, String)>,
}

/// The rule whose span the current thread is in (the innermost `rule` field), for code that
/// must attribute work to a rule without being handed it (a remote retry counted in
/// `concatd_remote_retries_total`). None outside the daemon's subscriber, or outside any rule.
pub fn current_rule() -> Option<String> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            span.scope().find_map(|s| {
                s.extensions()
                    .get::<SpanFields>()
                    .and_then(|f| f.rule.clone())
            })
        })
        .flatten()
}

/// Collects an event's (or span's) fields: `message` apart, the others as `key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
    rule: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => push_escaped(&mut self.message, value),
            "rule" => self.rule = Some(value.to_owned()),
            name => self.rest.push((name, escape(value).into_owned())),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(Escaped(&mut self.message), "{value:?}");
            }
            "rule" => self.rule = Some(format!("{value:?}")),
            name => {
                let mut text = String::new();
                let _ = write!(Escaped(&mut text), "{value:?}");
                self.rest.push((name, text));
            }
        }
    }
}

/// The sifting layer: events inside a span with a `rule` field go to that rule's file.
pub struct SiftingLayer {
    logs: RuleLogs,
}

impl SiftingLayer {
    /// A layer writing through `logs`.
    pub fn new(logs: RuleLogs) -> Self {
        Self { logs }
    }
}

impl<S> Layer<S> for SiftingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields {
                rule: fields.rule,
                fields: fields.rest,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() > Level::INFO {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut rule = None;
        let mut context = Vec::new();
        for span in scope.from_root() {
            if let Some(f) = span.extensions().get::<SpanFields>() {
                rule = f.rule.clone().or(rule);
                context.extend(f.fields.iter().cloned());
            }
        }
        let Some(rule) = rule else { return };
        let mut line = format!(
            "{} {:>5} {}",
            humantime::format_rfc3339_millis(SystemTime::now()),
            event.metadata().level(),
            fields.message,
        );
        for (k, v) in context
            .iter()
            .filter(|(k, _)| !fields.rest.iter().any(|(e, _)| e == k))
            .chain(&fields.rest)
        {
            let _ = write!(line, " {k}={v}");
        }
        line.push('\n');
        self.logs.write_line(&rule, &line);
    }
}

/// Install the daemon's subscriber: stderr (filtered by `RUST_LOG`, default info) and the
/// per-rule files. Returns the handle used to reconfigure the rule files on reload.
pub fn init_daemon() -> RuleLogs {
    use tracing_subscriber::prelude::*;
    let logs = RuleLogs::default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer()
        .fmt_fields(EscapedFields)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(SiftingLayer::new(logs.clone()))
        .try_init();
    logs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_sortable_stamps() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_099_932);
        assert_eq!(period(Rotation::Daily, t).unwrap(), "2025-11-25");
        assert_eq!(period(Rotation::Hourly, t).unwrap(), "2025-11-25T19");
        assert_eq!(period(Rotation::Never, t), None);
    }

    #[test]
    fn a_stale_live_file_is_rotated_and_old_ones_pruned() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["2020-01-01", "2020-01-02", "2020-01-03"] {
            std::fs::write(dir.path().join(format!("r.log.{d}")), "old\n").unwrap();
        }
        let live = rule_log_path(dir.path(), "r");
        std::fs::write(&live, "yesterday\n").unwrap();
        let old = File::options().write(true).open(&live).unwrap();
        old.set_modified(SystemTime::now() - std::time::Duration::from_secs(3 * 86400))
            .unwrap();
        let mut f = RuleFile::open(dir.path(), "r", Rotation::Daily, 2).unwrap();
        f.write_all(b"today\n").unwrap();
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "today\n");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}"); // live + 2 kept
        assert!(names.contains(&"r.log".to_owned()));
    }
}
