//! The `api:` section of the rules file: where the HTTP API listens, who may call it, and the
//! limits that keep slow or greedy clients from holding the daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::parse_size;
use super::validate::{SizeValue, Validator};

/// The validated `api:` section. The API is off when the rules file has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Unix socket (mode 0660); peers are checked with `SO_PEERCRED` against `socket_uids`.
    pub socket: Option<PathBuf>,
    /// Uids allowed on the socket besides the daemon's own.
    pub socket_uids: Vec<u32>,
    /// TCP address (`127.0.0.1:0` picks a free port; the bound address is logged).
    pub listen: Option<SocketAddr>,
    /// Hashed bearer tokens for TCP: lines `<sha256 hex> <rule>[,<rule>…]` or `<sha256 hex> *`.
    pub tokens_file: Option<PathBuf>,
    /// Largest request body; larger ones are answered `413`.
    pub max_body: u64,
    /// Longest a sync call (`?wait=`) waits before it answers `202` with the job id.
    pub wait_max: Duration,
    /// Longest a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body.
    pub body_timeout: Duration,
    /// Connections served at once (socket and TCP together); more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: None,
            socket_uids: Vec::new(),
            listen: None,
            tokens_file: None,
            max_body: 64 << 20,
            wait_max: Duration::from_secs(15 * 60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 256,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct RawApi {
    socket: Option<String>,
    socket_uids: Option<Vec<u32>>,
    listen: Option<String>,
    tokens_file: Option<String>,
    max_body: Option<SizeValue>,
    wait_max: Option<String>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<u64>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

impl Validator<'_> {
    pub(super) fn api(&mut self, raw: RawApi) -> ApiConfig {
        self.unknown(None, "api.", raw.unknown);
        let d = ApiConfig::default();
        let socket = raw.socket.map(|s| self.base.join(s));
        let listen = raw.listen.and_then(|l| match l.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.issue(
                    None,
                    "api.listen",
                    format!("'{l}' is not an address such as 127.0.0.1:8707 or [::1]:8707"),
                );
                None
            }
        });
        let tokens_file = raw.tokens_file.map(|t| self.base.join(t));
        if socket.is_none() && listen.is_none() {
            self.issue(
                None,
                "api",
                "neither socket nor listen: the API would not be reachable",
            );
        }
        if listen.is_some() && tokens_file.is_none() {
            self.issue(
                None,
                "api.tokens_file",
                "missing: TCP callers need a token (add tokens_file, then `concatd token`)",
            );
        }
        let max_body = match raw.max_body {
            None => Ok(d.max_body),
            Some(SizeValue::Bytes(n)) => Ok(n),
            Some(SizeValue::Text(t)) => parse_size(&t),
        };
        let max_body = match max_body {
            Ok(0) => {
                self.issue(None, "api.max_body", "must be at least 1 byte");
                d.max_body
            }
            Ok(n) => n,
            Err(m) => {
                self.issue(None, "api.max_body", m);
                d.max_body
            }
        };
        let mut duration = |key: &str, text: Option<String>, default: Duration| {
            text.map_or(default, |t| {
                self.nonzero_duration(None, &format!("api.{key}"), &t, default)
            })
        };
        let wait_max = duration("wait_max", raw.wait_max, d.wait_max);
        let header_timeout = duration("header_timeout", raw.header_timeout, d.header_timeout);
        let body_timeout = duration("body_timeout", raw.body_timeout, d.body_timeout);
        let max_connections = match raw.max_connections {
            None => d.max_connections,
            Some(n @ 1..=65536) => n as usize,
            Some(_) => {
                self.issue(None, "api.max_connections", "must be between 1 and 65536");
                d.max_connections
            }
        };
        ApiConfig {
            socket,
            socket_uids: raw.socket_uids.unwrap_or_default(),
            listen,
            tokens_file,
            max_body,
            wait_max,
            header_timeout,
            body_timeout,
            max_connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{issues, parse_in};

    fn rules_with(api: &str) -> String {
        format!(
            "log_dir: logs\napi:\n{api}rules:\n  - name: a\n    watch: in\n    output_root: out\n"
        )
    }

    fn dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        dir
    }

    #[test]
    fn defaults_and_relative_paths() {
        let dir = dir();
        let rules = parse_in(dir.path(), &rules_with("  socket: api.sock\n")).unwrap();
        let api = rules.api.unwrap();
        assert_eq!(api.socket, Some(dir.path().join("api.sock")));
        assert_eq!(api.max_body, 64 << 20);
        assert_eq!(api.wait_max, std::time::Duration::from_secs(900));
        assert!(api.listen.is_none() && api.socket_uids.is_empty());
    }

    #[test]
    fn no_section_no_api() {
        let dir = dir();
        let text = "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: out\n";
        assert!(parse_in(dir.path(), text).unwrap().api.is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let dir = dir();
        let text = rules_with(
            "  listen: localhost\n  max_body: lots\n  wait_max: 0s\n  colour: red\n  max_connections: 0\n",
        );
        let all = issues(parse_in(dir.path(), &text).unwrap_err()).join("\n");
        for key in [
            "api.listen",
            "api.max_body",
            "api.wait_max",
            "api.colour",
            "api.max_connections",
        ] {
            assert!(all.contains(&format!("key '{key}'")), "{key}: {all}");
        }
        let text = rules_with("  listen: 127.0.0.1:0\n");
        let all = issues(parse_in(dir.path(), &text).unwrap_err()).join("\n");
        assert!(all.contains("key 'api.tokens_file': missing"), "{all}");
        let text = rules_with("  max_body: 1MiB\n");
        let all = issues(parse_in(dir.path(), &text).unwrap_err()).join("\n");
        assert!(
            all.contains("key 'api': neither socket nor listen"),
            "{all}"
        );
    }
}
