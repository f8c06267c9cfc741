//! The daemon's Prometheus metrics (names fixed by SPEC.md, "Metrics").
//!
//! One process-wide registry ([`render`] encodes it), fed by small calls named for the events
//! where they happen: the rule task (start, queue depth, rescans), the runner (a job running, its
//! filed result) and remote sources (retries). Every series of a rule exists, at 0, from the
//! moment its task starts ([`rule_started`]), so a dashboard sees the rule before its first job
//! and `rate()` has a starting point.
//!
//! Built on `prometheus-client` rather than `metrics` + `metrics-exporter-prometheus`: typed
//! families with no global recorder to install (a test builds its own [`Metrics`]), histogram
//! buckets fixed where the histogram is made, and four small dependencies instead of a recorder,
//! a sketch library and an HTTP listener we would not use. It writes the OpenMetrics text format
//! (counters are declared without `_total` and sampled with it); serve it with [`CONTENT_TYPE`].

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::result::{JobResult, Status};

/// The `Content-Type` of [`render`]'s text (Prometheus asks for it and parses it natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of `concatd_job_duration_seconds`: 1 ms to 24 h, roughly 1-2.5-5 per
/// decade and then the minutes and hours an operator reads a slow job in. Beyond 24 h: `+Inf`.
pub const DURATION_BUCKETS: [f64; 26] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    rule: String,
    status: String,
}

type HistogramFamily = Family<RuleLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// A registry holding concatd's metrics. The daemon uses the process-wide one behind the free
/// functions of this module; tests make their own.
pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    duration: HistogramFamily,
    bytes_written: Family<RuleLabel, Counter>,
    copied_bytes: Family<RuleLabel, Counter>,
    queue_depth: Family<RuleLabel, Gauge>,
    running: Family<RuleLabel, Gauge>,
    retries: Family<RuleLabel, Counter>,
    rescans: Family<RuleLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every concatd metric declared (and no series yet).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let jobs = Family::<JobLabels, Counter>::default();
        let duration = HistogramFamily::new_with_constructor(duration_histogram);
        let bytes_written = Family::<RuleLabel, Counter>::default();
        let copied_bytes = Family::<RuleLabel, Counter>::default();
        let queue_depth = Family::<RuleLabel, Gauge>::default();
        let running = Family::<RuleLabel, Gauge>::default();
        let retries = Family::<RuleLabel, Counter>::default();
        let rescans = Family::<RuleLabel, Counter>::default();
        // Counters are named without `_total`: the OpenMetrics encoder appends it.
        registry.register(
            "concatd_jobs",
            "Jobs whose result was filed, by outcome (succeeded, failed)",
            jobs.clone(),
        );
        registry.register(
            "concatd_job_duration_seconds",
            "Time from a job's start to its result, as in the result's duration_ms",
            duration.clone(),
        );
        registry.register(
            "concatd_bytes_written",
            "Bytes of published outputs that concatd wrote or uploaded itself",
            bytes_written.clone(),
        );
        registry.register(
            "concatd_copied_bytes",
            "Bytes of published S3 outputs copied server-side (UploadPartCopy), never downloaded",
            copied_bytes.clone(),
        );
        registry.register(
            "concatd_queue_depth",
            "Manifests and interrupted jobs waiting to start",
            queue_depth.clone(),
        );
        registry.register("concatd_jobs_running", "Jobs running now", running.clone());
        registry.register(
            "concatd_remote_retries",
            "Retried HTTP(S)/S3 requests (transient failures, busy answers, timeouts)",
            retries.clone(),
        );
        registry.register(
            "concatd_watch_rescans",
            "Full listings of a watch folder: one when the watch is armed, then one per notice \
             that events may have been lost (kernel queue overflow, watcher error)",
            rescans.clone(),
        );
        Self {
            registry,
            jobs,
            duration,
            bytes_written,
            copied_bytes,
            queue_depth,
            running,
            retries,
            rescans,
        }
    }

    /// Every series of `rule`, created at 0 where it does not exist yet (values kept otherwise,
    /// so a reload that keeps the rule does not reset it).
    pub fn rule_started(&self, rule: &str) {
        let r = label(rule);
        for status in [Status::Succeeded, Status::Failed] {
            let _ = self.jobs.get_or_create(&job_label(rule, status));
        }
        let _ = self.duration.get_or_create(&r);
        let _ = self.bytes_written.get_or_create(&r);
        let _ = self.copied_bytes.get_or_create(&r);
        let _ = self.queue_depth.get_or_create(&r);
        let _ = self.running.get_or_create(&r);
        let _ = self.retries.get_or_create(&r);
        let _ = self.rescans.get_or_create(&r);
    }

    /// A job's result was filed (in `done/` or `failed/`): count it, its duration and, when it
    /// published, its bytes.
    pub fn job_finished(&self, rule: &str, result: &JobResult, duration: Duration) {
        self.jobs
            .get_or_create(&job_label(rule, result.status))
            .inc();
        self.duration
            .get_or_create(&label(rule))
            .observe(duration.as_secs_f64());
        if result.succeeded() {
            let (written, copied) = output_bytes(result);
            self.bytes_written(rule, written);
            self.copied_bytes(rule, copied);
        }
    }

    /// `n` bytes of an output written (or uploaded) by concatd itself.
    pub fn bytes_written(&self, rule: &str, n: u64) {
        self.bytes_written.get_or_create(&label(rule)).inc_by(n);
    }

    /// `n` bytes of an S3 output copied server-side.
    pub fn copied_bytes(&self, rule: &str, n: u64) {
        self.copied_bytes.get_or_create(&label(rule)).inc_by(n);
    }

    /// Items added to (or, negative, taken from) the queues of `rule`. A delta, not a value:
    /// while a reload replaces a rule's task, the old and the new task each add their own
    /// share, and neither can overwrite the other's (see [`QueueDepth`]).
    pub fn queue_depth_add(&self, rule: &str, delta: i64) {
        self.queue_depth.get_or_create(&label(rule)).inc_by(delta);
    }

    /// A job of `rule` started running.
    pub fn job_started(&self, rule: &str) {
        self.running.get_or_create(&label(rule)).inc();
    }

    /// A job of `rule` stopped running (filed, cancelled or left for recovery).
    pub fn job_ended(&self, rule: &str) {
        self.running.get_or_create(&label(rule)).dec();
    }

    /// A remote request of `rule` failed transiently and is tried again.
    pub fn remote_retry(&self, rule: &str) {
        self.retries.get_or_create(&label(rule)).inc();
    }

    /// The watch folder of `rule` is listed in full at the watcher's request.
    pub fn watch_rescan(&self, rule: &str) {
        self.rescans.get_or_create(&label(rule)).inc();
    }

    /// The registry in the OpenMetrics text format (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a label type.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

fn label(rule: &str) -> RuleLabel {
    RuleLabel {
        rule: rule.to_owned(),
    }
}

fn job_label(rule: &str, status: Status) -> JobLabels {
    let status = match status {
        Status::Succeeded => "succeeded",
        Status::Failed => "failed",
    };
    JobLabels {
        rule: rule.to_owned(),
        status: status.to_owned(),
    }
}

/// (written by concatd, copied server-side) for a published result. S3 results carry
/// `uploaded_bytes` and `copied_bytes` (SPEC, result fields); without them (a local output)
/// every byte of `size` was written.
fn output_bytes(result: &JobResult) -> (u64, u64) {
    let size = result.size.unwrap_or(0);
    let copied = result.copied_bytes.unwrap_or(0);
    let written = result.uploaded_bytes.unwrap_or(size.saturating_sub(copied));
    (written, copied)
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide registry as OpenMetrics text, for `GET /metrics` (serve with
/// [`CONTENT_TYPE`]).
pub fn render() -> String {
    GLOBAL.render()
}

/// See [`Metrics::rule_started`].
pub fn rule_started(rule: &str) {
    GLOBAL.rule_started(rule);
}

/// See [`Metrics::job_finished`].
pub fn job_finished(rule: &str, result: &JobResult, duration: Duration) {
    GLOBAL.job_finished(rule, result, duration);
}

/// See [`Metrics::queue_depth_add`].
pub fn queue_depth_add(rule: &str, delta: i64) {
    GLOBAL.queue_depth_add(rule, delta);
}

/// One rule task's share of `concatd_queue_depth`: [`QueueDepth::set`] reports its queue's
/// length, and dropping it (the task stopped: its queue is gone) takes its share back out.
pub struct QueueDepth {
    rule: String,
    reported: i64,
}

/// Start reporting a rule task's queue length; see [`QueueDepth`].
pub fn queue_depth(rule: &str) -> QueueDepth {
    QueueDepth {
        rule: rule.to_owned(),
        reported: 0,
    }
}

impl QueueDepth {
    /// The task's queue now holds `n` items.
    pub fn set(&mut self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if n != self.reported {
            queue_depth_add(&self.rule, n - self.reported);
            self.reported = n;
        }
    }
}

impl Drop for QueueDepth {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// See [`Metrics::job_started`].
pub fn job_started(rule: &str) {
    GLOBAL.job_started(rule);
}

/// See [`Metrics::job_ended`].
pub fn job_ended(rule: &str) {
    GLOBAL.job_ended(rule);
}

/// See [`Metrics::remote_retry`].
pub fn remote_retry(rule: &str) {
    GLOBAL.remote_retry(rule);
}

/// See [`Metrics::watch_rescan`].
pub fn watch_rescan(rule: &str) {
    GLOBAL.watch_rescan(rule);
}

/// Counts a job of `rule` in `concatd_jobs_running` while it lives (ended on drop, so a panic
/// or an early return cannot leave the gauge high).
#[must_use = "the job counts as running only while the guard lives"]
pub struct Running {
    rule: String,
}

/// Start counting a running job of `rule`; see [`Running`].
pub fn job_running(rule: &str) -> Running {
    job_started(rule);
    Running {
        rule: rule.to_owned(),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        job_ended(&self.rule);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Samples of an OpenMetrics text: `name{labels}` (labels as written) to value. Checks the
    /// shape on the way: every line a comment or `series value`, and `# EOF` last.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.pop(), Some("# EOF"), "{text}");
        let mut out = HashMap::new();
        for line in lines {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(
                out.insert(series.to_owned(), value).is_none(),
                "twice: {line}"
            );
        }
        out
    }

    fn result(rule: &str, status: Status, size: Option<u64>) -> JobResult {
        let json = serde_json::json!({
            "status": status, "rule": rule, "manifest": "m.json", "job_id": "j",
            "size": size, "started_at": "", "finished_at": "", "duration_ms": 0,
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn every_series_of_a_started_rule_is_there_at_zero() {
        let m = Metrics::new();
        m.rule_started("r");
        let s = parse(&m.render());
        for series in [
            r#"concatd_jobs_total{rule="r",status="succeeded"}"#,
            r#"concatd_jobs_total{rule="r",status="failed"}"#,
            r#"concatd_job_duration_seconds_count{rule="r"}"#,
            r#"concatd_job_duration_seconds_sum{rule="r"}"#,
            r#"concatd_job_duration_seconds_bucket{le="+Inf",rule="r"}"#,
            r#"concatd_bytes_written_total{rule="r"}"#,
            r#"concatd_copied_bytes_total{rule="r"}"#,
            r#"concatd_queue_depth{rule="r"}"#,
            r#"concatd_jobs_running{rule="r"}"#,
            r#"concatd_remote_retries_total{rule="r"}"#,
            r#"concatd_watch_rescans_total{rule="r"}"#,
        ] {
            assert_eq!(s.get(series), Some(&0.0), "{series} in {s:?}");
        }
        // 26 buckets and +Inf, 2 job series, sum and count, and 6 single series.
        assert_eq!(s.len(), 27 + 2 + 2 + 6, "{s:?}");
    }

    #[test]
    fn events_are_counted_per_rule() {
        let m = Metrics::new();
        m.rule_started("a");
        m.rule_started("b");
        let ms = Duration::from_millis;
        m.job_finished("a", &result("a", Status::Succeeded, Some(100)), ms(3));
        m.job_finished("a", &result("a", Status::Succeeded, Some(23)), ms(1500));
        m.job_finished("a", &result("a", Status::Failed, None), ms(10));
        m.queue_depth_add("a", 7);
        m.queue_depth_add("b", 2);
        m.queue_depth_add("b", -1);
        m.remote_retry("b");
        m.remote_retry("b");
        m.watch_rescan("a");
        let running = [job_running("x"), job_running("x")];
        m.job_started("a");
        m.job_started("a");
        m.job_ended("a");
        let s = parse(&m.render());
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("{k} missing: {s:?}"));
        assert_eq!(
            get(r#"concatd_jobs_total{rule="a",status="succeeded"}"#),
            2.0
        );
        assert_eq!(get(r#"concatd_jobs_total{rule="a",status="failed"}"#), 1.0);
        assert_eq!(
            get(r#"concatd_jobs_total{rule="b",status="succeeded"}"#),
            0.0
        );
        assert_eq!(get(r#"concatd_job_duration_seconds_count{rule="a"}"#), 3.0);
        assert!((get(r#"concatd_job_duration_seconds_sum{rule="a"}"#) - 1.513).abs() < 1e-9);
        // Only published outputs count as written.
        assert_eq!(get(r#"concatd_bytes_written_total{rule="a"}"#), 123.0);
        assert_eq!(get(r#"concatd_copied_bytes_total{rule="a"}"#), 0.0);
        assert_eq!(get(r#"concatd_queue_depth{rule="a"}"#), 7.0);
        assert_eq!(get(r#"concatd_queue_depth{rule="b"}"#), 1.0);
        assert_eq!(get(r#"concatd_remote_retries_total{rule="b"}"#), 2.0);
        assert_eq!(get(r#"concatd_remote_retries_total{rule="a"}"#), 0.0);
        assert_eq!(get(r#"concatd_watch_rescans_total{rule="a"}"#), 1.0);
        assert_eq!(get(r#"concatd_jobs_running{rule="a"}"#), 1.0);
        // The guards count in the process-wide registry, and end with their job.
        let global = |s: &HashMap<String, f64>| s.get(r#"concatd_jobs_running{rule="x"}"#).copied();
        assert_eq!(global(&parse(&render())), Some(2.0));
        drop(running);
        assert_eq!(global(&parse(&render())), Some(0.0));
    }

    #[test]
    fn two_tasks_of_one_rule_report_their_own_share_of_the_queue() {
        let depth = || {
            parse(&render())
                .get(r#"concatd_queue_depth{rule="q"}"#)
                .copied()
        };
        let mut old = queue_depth("q");
        old.set(5);
        // A reload replaces the task: the new one starts before the old one has stopped.
        let mut new = queue_depth("q");
        new.set(3);
        assert_eq!(depth(), Some(8.0));
        old.set(4);
        drop(old);
        assert_eq!(
            depth(),
            Some(3.0),
            "the old task's stop does not zero the new one's"
        );
        new.set(0);
        new.set(2);
        assert_eq!(depth(), Some(2.0));
        drop(new);
        assert_eq!(depth(), Some(0.0));
    }

    #[test]
    fn duration_buckets_run_from_a_millisecond_to_a_day_and_bounds_are_inclusive() {
        assert_eq!(DURATION_BUCKETS[0], 0.001);
        assert_eq!(DURATION_BUCKETS[DURATION_BUCKETS.len() - 1], 86_400.0);
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        let m = Metrics::new();
        let r = result("r", Status::Succeeded, Some(1));
        // On a bound (le is "less or equal"), just past it, and past a day.
        for d in [
            Duration::from_millis(1),
            Duration::from_micros(1001),
            Duration::from_secs(86_400),
            Duration::from_secs(86_401),
        ] {
            m.job_finished("r", &r, d);
        }
        let s = parse(&m.render());
        let bucket =
            |le: &str| s[&format!(r#"concatd_job_duration_seconds_bucket{{le="{le}",rule="r"}}"#)];
        assert_eq!(bucket("0.001"), 1.0);
        assert_eq!(bucket("0.0025"), 2.0);
        assert_eq!(bucket("43200.0"), 2.0);
        assert_eq!(bucket("86400.0"), 3.0);
        assert_eq!(bucket("+Inf"), 4.0);
        let les = s
            .keys()
            .filter(|k| k.starts_with("concatd_job_duration_seconds_bucket"))
            .count();
        assert_eq!(les, DURATION_BUCKETS.len() + 1);
    }

    #[test]
    fn s3_results_split_uploaded_and_copied_bytes() {
        let m = Metrics::new();
        let mut json = serde_json::to_value(result("s", Status::Succeeded, Some(100))).unwrap();
        // The fields S3 results carry (SPEC), whether or not `JobResult` names them yet.
        json["copied_bytes"] = 70.into();
        json["uploaded_bytes"] = 30.into();
        let r: JobResult = serde_json::from_value(json.clone()).unwrap();
        let (w, c) = output_bytes(&r);
        if serde_json::to_value(&r)
            .unwrap()
            .get("copied_bytes")
            .is_some()
        {
            assert_eq!((w, c), (30, 70));
        } else {
            // Not typed on this build: every byte counts as written.
            assert_eq!((w, c), (100, 0));
        }
        m.job_finished("s", &r, Duration::ZERO);
        let s = parse(&m.render());
        assert_eq!(s[r#"concatd_bytes_written_total{rule="s"}"#], w as f64);
        assert_eq!(s[r#"concatd_copied_bytes_total{rule="s"}"#], c as f64);
    }

    #[test]
    fn hostile_rule_names_stay_inside_their_label() {
        let m = Metrics::new();
        let evil = "a\"} concatd_jobs_total{rule=\"x\n";
        m.rule_started(evil);
        m.remote_retry(evil);
        let text = m.render();
        let s = parse(&text);
        // Quote, brace and newline escaped: one series, its label the whole name.
        let series = r#"concatd_remote_retries_total{rule="a\"} concatd_jobs_total{rule=\"x\n"}"#;
        assert_eq!(s.get(series), Some(&1.0), "{text}");
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            s.len()
        );
    }
}
