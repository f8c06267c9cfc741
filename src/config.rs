//! The rules file: raw YAML → validated [`Rules`], in two stages.
//!
//! Stage one deserializes into `Raw*` types that accept any key (unknown keys are captured, not
//! rejected) so that stage two can report *every* problem at once — unknown keys, missing folders,
//! bad sizes, duplicate names — each naming its rule and key, the way `concatd check` prints them.
//! Relative folders are taken relative to the rules file's own folder, so a rules file shipped in a
//! repository works from any working directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod api;
mod remote;
pub mod urls;
mod validate;

pub use api::ApiConfig;
pub use remote::RemoteConfig;
pub use urls::UrlPolicy;
use validate::{RawRules, Validator};

/// Default and ceiling of `max_output_size`: 50 TiB.
pub const DEFAULT_MAX_OUTPUT_SIZE: u64 = 50 << 40;

/// How a job writes its output. See the README for the measurements behind `Auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The measured fastest for the job's shape (see [`WriteMode::resolve`]).
    Auto,
    /// `pread` each source into a small buffer, hash it while it is in cache, `pwrite` it.
    Pwrite,
    /// In-kernel `copy_file_range` of each long source range a block at a time, each block hashed
    /// from a read-only map of the output right after; short ranges go through the buffer as in
    /// `Pwrite`. Shares extents where the output's filesystem can.
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

    /// The concrete mode a job uses. `auto` is `copy_file_range`: on the benchmarks in `bench/`
    /// it was the fastest for large and medium sources and as fast as `pwrite` for small ones,
    /// which it packs through the same buffer (README, "Write modes"). Where the output's
    /// filesystem shares extents, `copy_file_range` shares them.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => Self::CopyFileRange,
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

/// Where a rule's outputs land: a local folder, or a prefix of a bucket in the rule's S3 store —
/// never both, so no code path has to guess which one a job writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputRoot {
    /// A folder (absolute): outputs are files published by rename.
    Local(PathBuf),
    /// `s3://bucket/prefix/`: outputs are objects published by `CompleteMultipartUpload`.
    S3(S3Root),
}

impl OutputRoot {
    /// The folder of a local root; `None` for S3.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Self::Local(p) => Some(p),
            Self::S3(_) => None,
        }
    }

    /// As a user wrote it (a folder, or the `s3://` URL).
    pub fn display(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
        }
    }
}

/// A bucket and a key prefix that belongs to concatd (see the README, "S3 outputs").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Root {
    pub bucket: String,
    /// Empty, or ending in `/`; no empty, `.` or `..` segments.
    pub prefix: String,
}

impl S3Root {
    /// The URL of the object at `key` (a full key, prefix included).
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

/// How an S3 output's BLAKE3 is known (rules key `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Hash what passes through; copied bytes are vouched for by the store's checksums.
    #[default]
    Auto,
    /// Read the finished object back (before it is published) and hash every byte.
    ReadBack,
}

impl Verify {
    /// The rules file's name of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::ReadBack => "read_back",
        }
    }
}

/// Where a rule's sources may come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allow {
    /// Local sources must resolve (symlinks followed) inside one of these folders.
    pub paths: Vec<PathBuf>,
    /// Remote sources must lie under one of these URL prefixes (parsed and checked here, so a
    /// rule that loads has a policy that works).
    pub urls: UrlPolicy,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub watch: PathBuf,
    pub output_root: OutputRoot,
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
    /// S3 outputs: how the output's BLAKE3 is known.
    pub verify: Verify,
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
    /// The HTTP API (`api:`); off when absent.
    pub api: Option<ApiConfig>,
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
    let mut v = Validator::new(base);
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
