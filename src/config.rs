//! The rules file: raw YAML → validated [`Rules`], in two stages.
//!
//! Stage one deserializes into `Raw*` types that accept any key (unknown keys are captured, not
//! rejected) so that stage two can report *every* problem at once — unknown keys, missing folders,
//! bad sizes, duplicate names — each naming its rule and key, the way `concatd check` prints them.
//! Relative folders are taken relative to the rules file's own folder, so a rules file shipped in a
//! repository works from any working directory.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

mod remote;

use remote::RawRemote;
pub use remote::RemoteConfig;

/// Default and ceiling of `max_output_size`: 50 TiB.
pub const DEFAULT_MAX_OUTPUT_SIZE: u64 = 50 << 40;

/// How a job writes its output. See the README for the measurements behind `Auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The measured fastest for the job's shape (see [`WriteMode::resolve`]).
    Auto,
    /// `pread` each source into a small buffer, hash it while it is in cache, `pwrite` it.
    Pwrite,
    /// In-kernel `copy_file_range` from each source, then hash the written range from cache.
    CopyFileRange,
    /// `pread` each source straight into a bounded memory-mapped window of the output.
    Mmap,
}

impl WriteMode {
    /// The spec's name of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Pwrite => "pwrite",
            Self::CopyFileRange => "copy_file_range",
            Self::Mmap => "mmap",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "pwrite" => Self::Pwrite,
            "copy_file_range" => Self::CopyFileRange,
            "mmap" => Self::Mmap,
            _ => return None,
        })
    }

    /// The concrete mode a job uses. `auto` is `pwrite`: on the benchmarks in `bench/` it was the
    /// fastest for large, medium and small sources alike (README, "Write modes").
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => Self::Pwrite,
            other => other,
        }
    }
}

/// How often per-rule logs are rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    Hourly,
    Daily,
    Never,
}

/// S3-compatible endpoint settings of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
}

/// Where a rule's sources may come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allow {
    /// Local sources must resolve (symlinks followed) inside one of these folders.
    pub paths: Vec<PathBuf>,
    /// Remote sources must start with one of these URL prefixes.
    pub urls: Vec<String>,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub watch: PathBuf,
    pub output_root: PathBuf,
    pub source_root: Option<PathBuf>,
    pub allow: Allow,
    pub max_output_size: u64,
    pub overwrite: bool,
    pub checksum_file: bool,
    pub fsync: bool,
    pub write_mode: WriteMode,
    /// Jobs of this rule that may run at once.
    pub concurrency: usize,
    /// Poll the folder at this interval instead of using inotify (network filesystems).
    pub poll_interval: Option<Duration>,
    pub s3: Option<S3Config>,
    pub remote: RemoteConfig,
}

/// The validated rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The file this was read from (for reload).
    pub path: PathBuf,
    pub log_dir: PathBuf,
    pub log_rotation: Rotation,
    /// Rotated log files kept per rule.
    pub log_keep: usize,
    /// Jobs that may run at once across all rules.
    pub max_jobs: usize,
    /// How long running jobs may go on after SIGTERM before they are aborted.
    pub shutdown_grace: Duration,
    pub rules: Vec<Rule>,
}

impl Rules {
    /// The rule called `name`.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// One problem found in a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The rule's name (or `#index` when it has none); `None` for top-level keys.
    pub rule: Option<String>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "rule {rule}: key '{}': {}", self.key, self.message),
            None => write!(f, "key '{}': {}", self.key, self.message),
        }
    }
}

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules file {path} is not valid YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("rules file {path} has {} problem(s):\n{}", issues.len(), list(issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

fn list(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Deserialize)]
struct RawRules {
    log_dir: Option<String>,
    log_rotation: Option<String>,
    log_keep: Option<u64>,
    max_jobs: Option<u64>,
    shutdown_grace: Option<String>,
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
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Parse a size such as `50TiB`, `1.5GiB`, `1MB` or `4096`. `KiB`/`MiB`/… are powers of 1024,
/// `KB`/`MB`/… powers of 1000, as `bytesize` defines them.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty size".into());
    }
    trimmed
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("'{text}' is not a size ({e}); use e.g. 4096, 64MiB, 50TiB, 1GB"))
}

/// Parse a duration such as `30s`, `5m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration ({e}); use e.g. 250ms, 30s, 5m"))
}

/// Read and validate a rules file. Every problem is reported, not just the first.
pub fn load(path: &Path) -> Result<Rules, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::path::absolute(&base).unwrap_or(base);
    parse(&text, path, &base)
}

/// Validate rules text; relative folders are joined to `base`.
pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Rules, ConfigError> {
    let raw: RawRules = crate::yaml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut v = Validator {
        base,
        issues: Vec::new(),
    };
    let rules = v.rules(raw);
    if v.issues.is_empty() {
        Ok(Rules {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            ..rules
        })
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            issues: v.issues,
        })
    }
}

struct Validator<'a> {
    base: &'a Path,
    issues: Vec<Issue>,
}

impl Validator<'_> {
    fn issue(&mut self, rule: Option<&str>, key: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            rule: rule.map(str::to_owned),
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn unknown(&mut self, rule: Option<&str>, prefix: &str, keys: BTreeMap<String, IgnoredAny>) {
        for key in keys.into_keys() {
            self.issue(rule, &format!("{prefix}{key}"), "unknown key");
        }
    }

    fn rules(&mut self, raw: RawRules) -> Rules {
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
        Rules {
            path: PathBuf::new(),
            log_dir,
            log_rotation,
            log_keep: raw.log_keep.unwrap_or(14) as usize,
            max_jobs,
            shutdown_grace,
            rules,
        }
    }

    /// A watch folder must belong to one rule, and must not receive outputs: a published output
    /// (or its `.b3`) landing in a watched folder would be taken as a manifest.
    fn overlaps(&mut self, rules: &[Rule]) {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        for (i, rule) in rules.iter().enumerate() {
            let watch = canonical(&rule.watch);
            let label = format!("'{}'", rule.name);
            for (j, other) in rules.iter().enumerate() {
                if watch.starts_with(canonical(&other.output_root)) {
                    let whose = if i == j {
                        "its own output_root".to_owned()
                    } else {
                        format!("the output_root of rule '{}'", other.name)
                    };
                    self.issue(
                        Some(&label),
                        "watch",
                        format!(
                            "{} lies inside {whose}: outputs would be taken as manifests",
                            rule.watch.display()
                        ),
                    );
                }
                if j < i && watch == canonical(&other.watch) {
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
            Some(o) => self.folder(&label, "output_root", &o),
            None => {
                self.issue(r, "output_root", "missing: the folder outputs land in");
                PathBuf::new()
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
                } else if let Err(e) =
                    crate::source::policy::UrlPolicy::new(std::slice::from_ref(u))
                {
                    self.issue(r, "allow.urls", e.0);
                }
            }
            allow.urls = a.urls;
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
        let poll_interval = raw.poll_interval.map(|t| match parse_duration(&t) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.issue(r, "poll_interval", "must be longer than 0s");
                Duration::from_secs(1)
            }
            Err(m) => {
                self.issue(r, "poll_interval", m);
                Duration::from_secs(1)
            }
        });
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse_in(dir: &Path, text: &str) -> Result<Rules, ConfigError> {
        parse(text, &dir.join("rules.yaml"), dir)
    }

    pub(super) fn issues(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid { issues, .. } => issues.iter().map(|i| i.to_string()).collect(),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn minimal_rule_gets_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let rules = parse_in(
            dir.path(),
            "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: out\n    source_root: in\n",
        )
        .unwrap();
        let r = &rules.rules[0];
        assert_eq!(r.max_output_size, DEFAULT_MAX_OUTPUT_SIZE);
        assert!(!r.overwrite && r.checksum_file && r.fsync);
        assert_eq!(r.allow.paths, vec![dir.path().join("in")]);
        assert_eq!(r.write_mode, WriteMode::Auto);
    }

    #[test]
    fn every_problem_is_reported_with_rule_and_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let text = "log_dir: logs\nbogus: 1\nrules:\n  - name: a\n    watch: in\n    output_root: nope\n    max_output_size: 12 parsecs\n    colour: red\n  - name: a\n    watch: in\n    output_root: in\n    write_mode: fast\n";
        let found = issues(parse_in(dir.path(), text).unwrap_err());
        let all = found.join("\n");
        assert!(all.contains("key 'bogus': unknown key"), "{all}");
        assert!(all.contains("rule 'a': key 'output_root'"), "{all}");
        assert!(all.contains("rule 'a': key 'max_output_size'"), "{all}");
        assert!(all.contains("rule 'a': key 'colour': unknown key"), "{all}");
        assert!(
            all.contains("rule 'a': key 'name': duplicate rule name"),
            "{all}"
        );
        assert!(all.contains("key 'write_mode'"), "{all}");
    }

    #[test]
    fn watch_folders_may_not_receive_outputs_or_be_shared() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["out/in", "a", "b"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let text = "log_dir: logs\nrules:\n  - name: x\n    watch: out/in\n    output_root: out\n  - name: y\n    watch: a\n    output_root: b\n  - name: z\n    watch: a\n    output_root: b\n    poll_interval: 0s\n";
        let all = issues(parse_in(dir.path(), text).unwrap_err()).join("\n");
        assert!(
            all.contains("rule 'x': key 'watch'") && all.contains("its own output_root"),
            "{all}"
        );
        assert!(
            all.contains("rule 'z': key 'watch'") && all.contains("also watched by rule 'y'"),
            "{all}"
        );
        assert!(
            all.contains("rule 'z': key 'poll_interval': must be longer than 0s"),
            "{all}"
        );
    }

    #[test]
    fn sizes_use_binary_and_decimal_units() {
        assert_eq!(parse_size("50TiB").unwrap(), 50 << 40);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
    }
}
