//! Stage two of reading a rules file: raw, permissive types (unknown keys captured, sizes and
//! durations still text) checked key by key, every problem collected as an [`Issue`] naming its
//! rule and key.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::remote::RawRemote;
use super::urls::UrlPolicy;
use super::{
    Allow, DEFAULT_MAX_OUTPUT_SIZE, Issue, OutputRoot, Rotation, Rule, Rules, S3Config, S3Root,
    Verify, WriteMode, parse_duration, parse_size,
};

/// The daemon's own folders inside a watch folder: claimed jobs, and filed manifests with their
/// results.
const WATCH_SUBFOLDERS: [&str; 3] = [".work", "done", "failed"];

/// `path` made absolute with symlinks resolved, as far as it exists; the part that does not
/// exist yet is appended as written.
fn resolved(path: &Path) -> PathBuf {
    let mut existing = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut rest = Vec::new();
    let mut base = loop {
        if let Ok(p) = std::fs::canonicalize(&existing) {
            break p;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_owned();
            }
            // `..` at the end, or the root itself unreadable: compare as written.
            _ => break existing.clone(),
        }
    };
    for name in rest.iter().rev() {
        base.push(name);
    }
    base
}

#[derive(Deserialize)]
pub(super) struct RawRules {
    log_dir: Option<String>,
    log_rotation: Option<String>,
    log_keep: Option<u64>,
    max_jobs: Option<u64>,
    shutdown_grace: Option<String>,
    api: Option<super::api::RawApi>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Deserialize)]
struct RawRule {
    name: Option<String>,
    watch: Option<String>,
    output_root: Option<String>,
    source_root: Option<String>,
    allow: Option<RawAllow>,
    max_output_size: Option<SizeValue>,
    overwrite: Option<bool>,
    checksum_file: Option<bool>,
    fsync: Option<bool>,
    write_mode: Option<String>,
    concurrency: Option<u64>,
    poll_interval: Option<String>,
    s3: Option<RawS3>,
    remote: Option<RawRemote>,
    verify: Option<String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Deserialize)]
struct RawAllow {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Deserialize)]
struct RawS3 {
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

/// A size written as a number of bytes or as text with a unit (`50TiB`, `1MB`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum SizeValue {
    Bytes(u64),
    Text(String),
}

pub(super) struct Validator<'a> {
    pub(super) base: &'a Path,
    pub(super) issues: Vec<Issue>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(base: &'a Path) -> Self {
        Self {
            base,
            issues: Vec::new(),
        }
    }

    pub(super) fn issue(&mut self, rule: Option<&str>, key: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            rule: rule.map(str::to_owned),
            key: key.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn unknown(
        &mut self,
        rule: Option<&str>,
        prefix: &str,
        keys: BTreeMap<String, IgnoredAny>,
    ) {
        for key in keys.into_keys() {
            self.issue(rule, &format!("{prefix}{key}"), "unknown key");
        }
    }

    pub(super) fn rules(&mut self, raw: RawRules) -> Rules {
        self.unknown(None, "", raw.unknown);
        let log_dir = match raw.log_dir {
            Some(d) => self.base.join(d),
            None => {
                self.issue(None, "log_dir", "missing: the folder for per-rule logs");
                PathBuf::new()
            }
        };
        let log_rotation = match raw.log_rotation.as_deref() {
            None | Some("daily") => Rotation::Daily,
            Some("hourly") => Rotation::Hourly,
            Some("never") => Rotation::Never,
            Some(other) => {
                self.issue(
                    None,
                    "log_rotation",
                    format!("'{other}' is not one of daily, hourly, never"),
                );
                Rotation::Daily
            }
        };
        let max_jobs = self.positive(None, "max_jobs", raw.max_jobs, 4);
        let shutdown_grace = match raw.shutdown_grace {
            None => Duration::from_secs(30),
            Some(text) => parse_duration(&text).unwrap_or_else(|m| {
                self.issue(None, "shutdown_grace", m);
                Duration::ZERO
            }),
        };
        let api = raw.api.map(|a| self.api(a));
        if raw.rules.is_empty() {
            self.issue(None, "rules", "no rules: add at least one");
        }
        let mut names = HashSet::new();
        let rules: Vec<Rule> = raw
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.rule(i, r, &mut names))
            .collect();
        self.overlaps(&rules);
        self.log_dir_apart(&log_dir, &rules);
        Rules {
            path: PathBuf::new(),
            log_dir,
            log_rotation,
            log_keep: raw.log_keep.unwrap_or(14) as usize,
            max_jobs,
            shutdown_grace,
            api,
            rules,
        }
    }

    /// A watch folder must belong to one rule, and must not receive outputs: a published output
    /// (or its `.b3`) landing in a watched folder would be taken as a manifest. The other way
    /// round as well: an `output_root` inside a watch folder, its `.work/`, `done/` or `failed/`
    /// (which may be symlinks elsewhere) would have outputs taken as manifests, filed as results,
    /// or swept as leftovers of a job. Paths are compared resolved, symlinks followed.
    fn overlaps(&mut self, rules: &[Rule]) {
        // Each path resolved once, not once per pair: a file of many rules must not cost
        // (rules)² path resolutions (found by fuzzing: 500 rules took 27 s).
        let watches: Vec<PathBuf> = rules.iter().map(|r| resolved(&r.watch)).collect();
        // S3 roots overlap no folder.
        let outputs: Vec<Option<PathBuf>> = rules
            .iter()
            .map(|r| r.output_root.local().map(resolved))
            .collect();
        let subfolders: Vec<Vec<(&str, PathBuf)>> = rules
            .iter()
            .map(|r| {
                WATCH_SUBFOLDERS
                    .iter()
                    .map(|sub| (*sub, resolved(&r.watch.join(sub))))
                    .collect()
            })
            .collect();
        for (i, rule) in rules.iter().enumerate() {
            // A missing folder (an empty path, reported already) overlaps nothing: compared, it
            // would be "inside" every other folder, one problem per pair of rules.
            if rule.watch.as_os_str().is_empty() {
                continue;
            }
            let watch = &watches[i];
            let label = format!("'{}'", rule.name);
            for (j, other) in rules.iter().enumerate() {
                let (Some(root), Some(other_root)) = (&outputs[j], other.output_root.local())
                else {
                    continue;
                };
                if other_root.as_os_str().is_empty() {
                    continue;
                }
                let whose = |what: &str| {
                    if i == j {
                        format!("its own {what}")
                    } else {
                        format!("the {what} of rule '{}'", other.name)
                    }
                };
                if watch.starts_with(root) {
                    self.issue(
                        Some(&label),
                        "watch",
                        format!(
                            "{} lies inside {}: outputs would be taken as manifests",
                            rule.watch.display(),
                            whose("output_root")
                        ),
                    );
                }
                // Reported on the rule whose output_root it is.
                let inside = subfolders[i]
                    .iter()
                    .find(|(_, p)| root.starts_with(p))
                    .map(|(sub, _)| format!("{sub}/ of "))
                    .or_else(|| root.starts_with(watch).then(String::new));
                if let Some(sub) = inside {
                    let whose = if i == j {
                        "its own watch folder".to_owned()
                    } else {
                        format!("the watch folder of rule '{}'", rule.name)
                    };
                    self.issue(
                        Some(&format!("'{}'", other.name)),
                        "output_root",
                        format!(
                            "{} lies inside {sub}{whose}: outputs would be taken as manifests \
                             or lost with the job's own files",
                            other_root.display()
                        ),
                    );
                }
                if j < i && *watch == watches[j] {
                    self.issue(
                        Some(&label),
                        "watch",
                        format!(
                            "{} is also watched by rule '{}'",
                            rule.watch.display(),
                            other.name
                        ),
                    );
                }
            }
        }
    }

    /// Rule logs in a watch folder would be taken as manifests (every name but a few is one), and
    /// in its `.work/` swept as a job's leftovers.
    fn log_dir_apart(&mut self, log_dir: &Path, rules: &[Rule]) {
        if log_dir.as_os_str().is_empty() {
            return;
        }
        let logs = resolved(log_dir);
        for rule in rules.iter().filter(|r| !r.watch.as_os_str().is_empty()) {
            if logs.starts_with(resolved(&rule.watch)) {
                self.issue(
                    None,
                    "log_dir",
                    format!(
                        "{} lies inside the watch folder of rule '{}': logs would be taken as \
                         manifests",
                        log_dir.display(),
                        rule.name
                    ),
                );
            }
        }
    }

    /// A duration that must be longer than zero (an interval or a timeout); `default` stands in
    /// after a reported problem.
    pub(super) fn nonzero_duration(
        &mut self,
        rule: Option<&str>,
        key: &str,
        text: &str,
        default: Duration,
    ) -> Duration {
        match parse_duration(text) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.issue(rule, key, "must be longer than 0s");
                default
            }
            Err(m) => {
                self.issue(rule, key, m);
                default
            }
        }
    }

    fn positive(&mut self, rule: Option<&str>, key: &str, v: Option<u64>, default: usize) -> usize {
        match v {
            None => default,
            Some(0) => {
                self.issue(rule, key, "must be at least 1");
                default
            }
            Some(n) => n as usize,
        }
    }

    fn folder(&mut self, rule: &str, key: &str, value: &str) -> PathBuf {
        let path = self.base.join(value);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => self.issue(
                Some(rule),
                key,
                format!("{} is not a folder", path.display()),
            ),
            Err(e) => self.issue(Some(rule), key, format!("folder {}: {e}", path.display())),
        }
        path
    }

    fn rule(&mut self, index: usize, raw: RawRule, names: &mut HashSet<String>) -> Rule {
        let name = match raw.name {
            Some(n) => {
                let label = format!("'{n}'");
                if n.is_empty()
                    || !n.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    })
                {
                    self.issue(Some(&label), "name", "must match [a-z0-9_-]+");
                }
                if !names.insert(n.clone()) {
                    self.issue(Some(&label), "name", "duplicate rule name");
                }
                n
            }
            None => {
                self.issue(Some(&format!("#{}", index + 1)), "name", "missing");
                format!("#{}", index + 1)
            }
        };
        let label = format!("'{name}'");
        let r = Some(label.as_str());
        self.unknown(r, "", raw.unknown);
        let watch = match raw.watch {
            Some(w) => self.folder(&label, "watch", &w),
            None => {
                self.issue(r, "watch", "missing: the folder manifests are dropped into");
                PathBuf::new()
            }
        };
        let output_root = match raw.output_root {
            Some(o) if o.starts_with("s3://") => OutputRoot::S3(s3_root(&o).unwrap_or_else(|m| {
                self.issue(r, "output_root", m);
                S3Root {
                    bucket: String::new(),
                    prefix: String::new(),
                }
            })),
            Some(o) => OutputRoot::Local(self.folder(&label, "output_root", &o)),
            None => {
                self.issue(
                    r,
                    "output_root",
                    "missing: the folder (or s3://bucket/prefix/) outputs land in",
                );
                OutputRoot::Local(PathBuf::new())
            }
        };
        let verify = match raw.verify.as_deref() {
            None | Some("auto") => Verify::Auto,
            Some("read_back") => Verify::ReadBack,
            Some(other) => {
                self.issue(
                    r,
                    "verify",
                    format!("'{other}' is not one of auto, read_back"),
                );
                Verify::Auto
            }
        };
        let source_root = raw
            .source_root
            .map(|s| self.folder(&label, "source_root", &s));
        let mut allow = Allow::default();
        if let Some(a) = raw.allow {
            self.unknown(r, "allow.", a.unknown);
            allow.paths = a
                .paths
                .iter()
                .map(|p| self.folder(&label, "allow.paths", p))
                .collect();
            for u in &a.urls {
                if !(u.starts_with("http://")
                    || u.starts_with("https://")
                    || u.starts_with("s3://"))
                {
                    self.issue(
                        r,
                        "allow.urls",
                        format!("'{u}' must start with http://, https:// or s3://"),
                    );
                } else if let Err(e) = UrlPolicy::new(std::slice::from_ref(u)) {
                    self.issue(r, "allow.urls", e.0);
                }
            }
            // Every entry parsed above; a bad one was reported and leaves the policy empty.
            allow.urls = UrlPolicy::new(&a.urls).unwrap_or_default();
        }
        if allow.paths.is_empty()
            && let Some(root) = &source_root
        {
            allow.paths.push(root.clone());
        }
        let max_output_size = match raw.max_output_size {
            None => DEFAULT_MAX_OUTPUT_SIZE,
            Some(SizeValue::Bytes(n)) => n,
            Some(SizeValue::Text(t)) => parse_size(&t).unwrap_or_else(|m| {
                self.issue(r, "max_output_size", m);
                0
            }),
        };
        if max_output_size > DEFAULT_MAX_OUTPUT_SIZE {
            self.issue(r, "max_output_size", "may not exceed 50TiB");
        }
        let write_mode = match raw.write_mode.as_deref() {
            None => WriteMode::Auto,
            Some(m) => WriteMode::parse(m).unwrap_or_else(|| {
                self.issue(
                    r,
                    "write_mode",
                    format!("'{m}' is not one of auto, pwrite, copy_file_range, mmap"),
                );
                WriteMode::Auto
            }),
        };
        let concurrency = self.positive(r, "concurrency", raw.concurrency, 1);
        let poll_interval = raw
            .poll_interval
            .map(|t| self.nonzero_duration(r, "poll_interval", &t, Duration::from_secs(1)));
        let s3 = raw.s3.map(|s| {
            self.unknown(r, "s3.", s.unknown);
            S3Config {
                endpoint: s.endpoint,
                region: s.region,
                path_style: s.path_style.unwrap_or(false),
            }
        });
        let remote = raw
            .remote
            .map(|raw| self.remote(r, raw))
            .unwrap_or_default();
        Rule {
            name,
            watch,
            output_root,
            source_root,
            allow,
            max_output_size,
            overwrite: raw.overwrite.unwrap_or(false),
            checksum_file: raw.checksum_file.unwrap_or(true),
            fsync: raw.fsync.unwrap_or(true),
            write_mode,
            concurrency,
            poll_interval,
            s3,
            remote,
            verify,
        }
    }
}

/// `s3://bucket/prefix/` as a bucket and a prefix that is empty or ends in `/`. The prefix is
/// concatd's (uploads under it that no job owns are aborted), so it must be a plain one.
fn s3_root(text: &str) -> Result<S3Root, String> {
    let rest = text.strip_prefix("s3://").unwrap_or(text);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(format!(
            "'{text}': the bucket must be 3 to 63 characters of a-z, 0-9, '-' and '.'"
        ));
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if !trimmed.is_empty()
        && trimmed
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "'{text}': the prefix may not have empty, '.' or '..' segments"
        ));
    }
    if prefix.bytes().any(|b| b.is_ascii_control()) || prefix.len() > 512 {
        return Err(format!(
            "'{text}': the prefix must be at most 512 bytes without control characters"
        ));
    }
    let prefix = if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    };
    Ok(S3Root {
        bucket: bucket.to_owned(),
        prefix,
    })
}
