//! Helpers of the API tests: a daemon with its API on a Unix socket and on a loopback port,
//! tokens, and a tiny blocking HTTP/1.1 client over either transport.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::support::{Daemon, Env, wait_until};

/// An answer: status, headers (names lowercase), body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The daemon with its API; `r1` (folder `in`) and `r2` (folder `in2`).
pub struct ApiEnv {
    pub env: Env,
    pub daemon: Option<Daemon>,
    pub socket: PathBuf,
    /// `127.0.0.1:PORT`, as the daemon logged it.
    pub addr: String,
}

impl ApiEnv {
    /// Rules with an `api:` section (`api_extra` appended to it) and `r1`'s `rule_extra`; not
    /// started yet.
    pub fn new(api_extra: &str, rule_extra: &str) -> Self {
        let env = Env::new("");
        std::fs::create_dir(env.path("api")).unwrap();
        env.write_rules(&format!(
            "log_dir: logs\nshutdown_grace: 10s\napi:\n  socket: api/api.sock\n  listen: \
             127.0.0.1:0\n  tokens_file: tokens\n  max_body: 4KiB\n{api_extra}rules:\n{}{}",
            super::support::rule("r1", "in", &format!("    fsync: false\n{rule_extra}")),
            super::support::rule("r2", "in2", "    fsync: false\n"),
        ));
        let socket = env.path("api/api.sock");
        Self {
            env,
            daemon: None,
            socket,
            addr: String::new(),
        }
    }

    /// Start the daemon and learn its TCP address from its log.
    pub fn start(&mut self) {
        let d = self.env.start();
        let log = d.log();
        self.addr = log
            .lines()
            .find_map(|l| {
                l.contains("api listening")
                    .then(|| l.split("address=").nth(1))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no api address in the log:\n{log}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        self.daemon = Some(d);
    }

    /// `concatd token` for `rules`; the token printed.
    pub fn token(&self, rules: &[&str]) -> String {
        let mut c = self.env.concatd();
        c.args(["token", "-c", "rules.yaml"]);
        for r in rules {
            c.args(["--rule", r]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn tcp(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        tcp(&self.addr, method, path, &headers, body)
    }

    pub fn unix(&self, method: &str, path: &str, body: &[u8]) -> Resp {
        unix(&self.socket, method, path, &[], body)
    }
}

pub fn tcp(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let s = TcpStream::connect(addr).unwrap();
    exchange(s, method, path, headers, body)
}

pub fn unix(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let s = UnixStream::connect(socket).unwrap();
    exchange(s, method, path, headers, body)
}

/// The request head of one call (`Connection: close`, so the answer ends with the stream).
pub fn head(method: &str, path: &str, headers: &[(&str, &str)], len: Option<usize>) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(n) = len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h
}

fn exchange<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    // A refused body may be cut off mid-write: the answer still comes.
    let _ = s.write_all(head(method, path, headers, Some(body.len())).as_bytes());
    let _ = s.write_all(body);
    read_answer(s)
}

/// Read an answer to its end and parse it (fixed-length or chunked body).
pub fn read_answer<S: Read>(mut s: S) -> Resp {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
    out
}

/// Poll `GET /v1/jobs/{id}` over the socket until it is finished; the answer's JSON.
pub fn poll_job(api: &ApiEnv, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(20), || {
        let r = api.unix("GET", &format!("/v1/jobs/{id}"), b"");
        assert_eq!(r.status, 200, "{}", r.text());
        last = r.json();
        last["result"].is_object()
    });
    last
}

/// A tmpfs of `size` mounted over `dir`, unmounted when dropped; `None` (with a note) where
/// mounting is not possible (not root).
pub fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Option<Unmount> {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return None;
    }
    Some(Unmount(dir.to_owned()))
}

/// Unmounts its folder when dropped.
pub struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
