//! The `remote:` section of a rule: timeouts, retries and parallelism of HTTP(S) and S3 sources.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::validate::{SizeValue, Validator};
use super::{parse_duration, parse_size};

/// How a rule talks to HTTP(S) and S3 sources (`remote:` in the rules file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (headers or body) before the transfer is
    /// called broken and retried from the last byte received.
    pub idle_timeout: Duration,
    /// Attempts per request (the first one included) before the job fails with `remote_failed`.
    pub attempts: u32,
    /// First retry delay; doubled per attempt (capped at 30 s), with random jitter.
    pub backoff: Duration,
    /// Ranged requests in flight at once per job.
    pub parallel: usize,
    /// Bytes per ranged request: a power of two, so each request is one node of the BLAKE3 tree.
    pub chunk_size: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            attempts: 5,
            backoff: Duration::from_millis(200),
            parallel: 4,
            chunk_size: 8 << 20,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct RawRemote {
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    attempts: Option<u64>,
    backoff: Option<String>,
    parallel: Option<u64>,
    chunk_size: Option<SizeValue>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

impl Validator<'_> {
    pub(super) fn remote(&mut self, r: Option<&str>, raw: RawRemote) -> RemoteConfig {
        self.unknown(r, "remote.", raw.unknown);
        let d = RemoteConfig::default();
        let connect_timeout = raw.connect_timeout.map_or(d.connect_timeout, |t| {
            self.nonzero_duration(r, "remote.connect_timeout", &t, d.connect_timeout)
        });
        let idle_timeout = raw.idle_timeout.map_or(d.idle_timeout, |t| {
            self.nonzero_duration(r, "remote.idle_timeout", &t, d.idle_timeout)
        });
        let backoff = match raw.backoff {
            None => d.backoff,
            Some(t) => parse_duration(&t).unwrap_or_else(|m| {
                self.issue(r, "remote.backoff", m);
                d.backoff
            }),
        };
        let attempts = match raw.attempts {
            None => d.attempts,
            Some(n @ 1..=100) => n as u32,
            Some(_) => {
                self.issue(r, "remote.attempts", "must be between 1 and 100");
                d.attempts
            }
        };
        let parallel = match raw.parallel {
            None => d.parallel,
            Some(n @ 1..=256) => n as usize,
            Some(_) => {
                self.issue(r, "remote.parallel", "must be between 1 and 256");
                d.parallel
            }
        };
        let chunk_size = match raw.chunk_size {
            None => Ok(d.chunk_size),
            Some(SizeValue::Bytes(n)) => Ok(n),
            Some(SizeValue::Text(t)) => parse_size(&t),
        };
        let chunk_size = match chunk_size {
            Ok(n) if n.is_power_of_two() && (64 << 10..=1 << 30).contains(&n) => n,
            Ok(n) => {
                self.issue(
                    r,
                    "remote.chunk_size",
                    format!("{n} bytes: must be a power of two from 64KiB to 1GiB"),
                );
                d.chunk_size
            }
            Err(m) => {
                self.issue(r, "remote.chunk_size", m);
                d.chunk_size
            }
        };
        RemoteConfig {
            connect_timeout,
            idle_timeout,
            attempts,
            backoff,
            parallel,
            chunk_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{issues, parse_in};
    use super::super::{ConfigError, Rules};
    use super::*;

    fn one_rule(extra: &str) -> Result<Rules, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        parse_in(
            dir.path(),
            &format!(
                "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: out\n{extra}"
            ),
        )
    }

    #[test]
    fn remote_defaults_and_values() {
        let r = one_rule("").unwrap();
        assert_eq!(r.rules[0].remote, RemoteConfig::default());
        let r = one_rule(
            "    remote:\n      connect_timeout: 2s\n      idle_timeout: 500ms\n      attempts: 3\n      backoff: 10ms\n      parallel: 8\n      chunk_size: 1MiB\n",
        )
        .unwrap();
        let remote = &r.rules[0].remote;
        assert_eq!(remote.connect_timeout, Duration::from_secs(2));
        assert_eq!(remote.idle_timeout, Duration::from_millis(500));
        assert_eq!((remote.attempts, remote.parallel), (3, 8));
        assert_eq!(remote.backoff, Duration::from_millis(10));
        assert_eq!(remote.chunk_size, 1 << 20);
    }

    #[test]
    fn remote_bad_values_are_reported_by_key() {
        let err = one_rule(
            "    allow:\n      urls: [\"https://\"]\n    remote:\n      connect_timeout: 0s\n      idle_timeout: soon\n      attempts: 0\n      parallel: 1000\n      chunk_size: 3MB\n      colour: red\n",
        )
        .unwrap_err();
        let all = issues(err).join("\n");
        for key in [
            "allow.urls",
            "remote.connect_timeout",
            "remote.idle_timeout",
            "remote.attempts",
            "remote.parallel",
            "remote.chunk_size",
            "remote.colour': unknown key",
        ] {
            assert!(all.contains(key), "{key} missing in {all}");
        }
    }
}
