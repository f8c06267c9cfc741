//! Sources: one face for every place bytes come from.
//!
//! A job touches each source twice. The planning pass [`Sources::probe`]s it — is it allowed, does
//! it exist, is it a regular object, how long is it — and records a [`Pin`] of what it saw. The copy
//! pass [`Sources::open`]s it again and refuses it (`source_changed`) unless it is still the object
//! that was planned, so a file swapped or rewritten between the passes never splices foreign bytes
//! into the output. Remote sources (`http(s)://`, `s3://`) live in [`remote`], [`http`] and
//! [`s3`], behind the allow policy of [`policy`]; their machinery (a tokio runtime, clients) is
//! set up on the first URL a job meets, so local-only jobs pay nothing for it.

pub mod http;
pub mod local;
pub mod policy;
pub mod redact;
pub mod remote;
pub mod s3;

use std::io::Read;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, OnceLock, RwLock};

use crate::config::{RemoteConfig, Rule, S3Config};
use crate::manifest::Location;

pub use local::LocalFile;
pub use redact::{Redacted, redact};
pub use remote::Version;
use remote::{RemoteReader, SequentialReader, Target};

/// Identity of a source as the planning pass saw it (for a local file: device, inode, size and
/// modification time folded into one number; for a remote object: the number of the [`Version`]
/// — ETag, Last-Modified, version id — the job recorded for it). Compared again when the source
/// is opened for copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pin(pub u64);

/// What the planning pass learns about a source.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The whole object's length in bytes.
    pub size: u64,
    pub pin: Pin,
    /// What the pin stands for, stable across processes (a remote [`Pin`] is only an index into
    /// this job's table): local files the same fold of device, inode, size, mtime and ctime;
    /// remote objects a fold of URL, ETag, Last-Modified, version id and size. A rerun of a job
    /// compares these to decide whether the bytes an earlier run copied can be kept.
    pub identity: u64,
}

/// What a [`Pin`] stands for, as [`Sources::describe`] tells it.
#[derive(Debug, Clone)]
pub enum PinDetail {
    Local(local::LocalDetail),
    Remote(Arc<Version>),
}

/// Why a source cannot be used. `what` is the source as the manifest wrote it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {reason}")]
    NotAllowed { what: String, reason: String },
    #[error("{what}: not found ({reason})")]
    NotFound { what: String, reason: String },
    #[error("{what}: not a regular file (it is a {file_type})")]
    NotRegular {
        what: String,
        file_type: &'static str,
    },
    #[error("{what}: read failed: {source}")]
    ReadFailed {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: changed while the job ran ({reason})")]
    Changed { what: String, reason: String },
    #[error("{what}: archived in storage class {class}; restore it first")]
    Archived { what: String, class: String },
    /// A remote source failed for good (the message names the URL and the HTTP status).
    #[error("{what}: {reason}")]
    Remote { what: String, reason: String },
}

impl SourceError {
    /// The error a reader reported, unwrapped when it is a `SourceError` carried in an
    /// `io::Error` (remote readers report `source_changed`/`remote_failed` that way).
    pub fn from_read(what: String, e: std::io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
            match e.into_inner().map(|inner| inner.downcast::<SourceError>()) {
                Some(Ok(inner)) => return *inner,
                Some(Err(other)) => {
                    return Self::ReadFailed {
                        what,
                        source: std::io::Error::other(other),
                    };
                }
                None => unreachable!("checked above"),
            }
        }
        Self::ReadFailed { what, source: e }
    }
}

/// An opened source, ready to be read at any offset from any thread.
pub enum Reader {
    Local(LocalFile),
    /// One ranged transfer of an HTTP(S) or S3 object: read it in order.
    Remote(Box<RemoteReader>),
}

impl Reader {
    /// Read into `buf` from `offset` of the source; short reads are possible, 0 means end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Self::Local(f) => f.read_at(buf, offset),
            Self::Remote(r) => r.read_at(buf, offset),
        }
    }

    /// After a range was read: refuse a local file that changed meanwhile (see
    /// [`LocalFile::recheck`]). Remote reads are pinned per request (`If-Match`), so they pass.
    pub fn recheck(&self) -> Result<(), SourceError> {
        match self {
            Self::Local(f) => f.recheck(),
            Self::Remote(_) => Ok(()),
        }
    }

    /// The file descriptor, where the source is a local file (for `copy_file_range`).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Local(f) => Some(f.fd()),
            Self::Remote(_) => None,
        }
    }
}

/// Every place a rule may take sources from, with its allow policy.
pub struct Sources {
    local: local::LocalResolver,
    allow_urls: Vec<String>,
    s3_config: Option<S3Config>,
    settings: RemoteConfig,
    remote: OnceLock<Result<Remote, String>>,
}

impl Sources {
    /// Set up the resolvers for one job of `rule`.
    pub fn new(rule: &Rule) -> Result<Self, SourceError> {
        Ok(Self {
            local: local::LocalResolver::new(rule.source_root.as_deref(), &rule.allow.paths)?,
            allow_urls: rule.allow.urls.clone(),
            s3_config: rule.s3.clone(),
            settings: rule.remote.clone(),
            remote: OnceLock::new(),
        })
    }

    /// The remote machinery, set up on first use.
    fn remote(&self, what: &str) -> Result<&Remote, SourceError> {
        self.remote
            .get_or_init(|| Remote::new(&self.allow_urls, self.s3_config.clone(), &self.settings))
            .as_ref()
            .map_err(|reason| SourceError::NotAllowed {
                what: redact(what).into_owned(),
                reason: reason.clone(),
            })
    }

    /// Check that a source is allowed, exists and is a regular object; learn its size and pin.
    pub fn probe(&self, location: &Location) -> Result<Probe, SourceError> {
        match location {
            Location::Path(p) => self.local.probe(p),
            Location::Url(u) => self.remote(u)?.probe(u),
        }
    }

    /// What the pin of a planned source stands for (`concatd plan`): a local file's resolved
    /// path and identity (`None` if it is no longer the file pinned), a remote object's
    /// validators.
    pub fn describe(&self, location: &Location, pin: Pin) -> Option<PinDetail> {
        match location {
            Location::Path(p) => self.local.describe(p, pin).map(PinDetail::Local),
            Location::Url(_) => {
                let remote = self.remote.get()?.as_ref().ok()?;
                Some(PinDetail::Remote(remote.version(pin)))
            }
        }
    }

    /// Open a probed source for reading `range` (which the caller then reads in order); fails
    /// with `Changed` unless it still matches `pin`. Local files ignore the range; remote sources
    /// use it to request exactly those bytes.
    pub fn open(
        &self,
        location: &Location,
        pin: Pin,
        range: std::ops::Range<u64>,
    ) -> Result<Reader, SourceError> {
        match location {
            Location::Path(p) => self.local.open(p, pin).map(Reader::Local),
            Location::Url(u) => self
                .remote(u)?
                .open(u, pin, range)
                .map(|r| Reader::Remote(Box::new(r))),
        }
    }

    /// Open a source list for streaming, returning its pin; with `expected`, refuse a list that
    /// is no longer the one planned (the copy pass must read the very items that were measured).
    pub fn open_list(
        &self,
        location: &Location,
        expected: Option<Pin>,
    ) -> Result<(Box<dyn Read + Send>, Pin), SourceError> {
        match location {
            Location::Path(p) => {
                let pin = match expected {
                    Some(pin) => pin,
                    None => self.local.probe(p)?.pin,
                };
                let file = self.local.open(p, pin)?;
                Ok((Box::new(file.into_reader()), pin))
            }
            Location::Url(u) => {
                let remote = self.remote(u)?;
                let pin = match expected {
                    Some(pin) => pin,
                    None => remote.probe(u)?.pin,
                };
                let size = remote.version(pin).size;
                let reader = remote.open(u, pin, 0..size)?;
                Ok((Box::new(SequentialReader { reader, pos: 0 }), pin))
            }
        }
    }
}

/// Clients, runtime and pinned versions for a job's remote sources.
struct Remote {
    /// Owned so it can be shut down without blocking when the job ends (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
    policy: Arc<policy::UrlPolicy>,
    http: Arc<http::HttpClient>,
    s3_config: Option<S3Config>,
    s3: OnceLock<Arc<s3::S3Client>>,
    settings: RemoteConfig,
    /// `Pin(n)` of a remote source is `versions[n]`.
    versions: RwLock<Vec<Arc<Version>>>,
}

impl Remote {
    fn new(
        allow_urls: &[String],
        s3_config: Option<S3Config>,
        settings: &RemoteConfig,
    ) -> Result<Self, String> {
        let policy = Arc::new(policy::UrlPolicy::new(allow_urls).map_err(|e| e.0)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("concatd-remote")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the network runtime: {e}"))?;
        // reqwest's client must be built inside the runtime that drives it.
        let http = {
            let _guard = rt.enter();
            http::HttpClient::new(policy.clone(), settings).map_err(|e| e.to_string())?
        };
        Ok(Self {
            rt: Some(rt),
            policy,
            http: Arc::new(http),
            s3_config,
            s3: OnceLock::new(),
            settings: settings.clone(),
            versions: RwLock::new(Vec::new()),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives as long as Remote")
    }

    /// Check the URL against the policy and find out who serves it.
    fn target(&self, text: &str) -> Result<Target, SourceError> {
        let refused = |reason: String| SourceError::NotAllowed {
            what: redact(text).into_owned(),
            reason,
        };
        let url = self.policy.check(text).map_err(|e| refused(e.0))?;
        match url.scheme() {
            "http" | "https" => Ok(Target::Http {
                client: self.http.clone(),
                url,
            }),
            "s3" => {
                let (bucket, key) = s3::bucket_and_key(&url)
                    .ok_or_else(|| refused("an s3 URL needs a bucket and a key".into()))?;
                let client = self
                    .s3
                    .get_or_init(|| {
                        let client = s3::S3Client::new(self.s3_config.as_ref(), &self.settings);
                        Arc::new(self.rt().block_on(client))
                    })
                    .clone();
                Ok(Target::S3 {
                    client,
                    bucket,
                    key,
                })
            }
            other => Err(refused(format!("the scheme {other}: is not supported"))),
        }
    }

    fn version(&self, pin: Pin) -> Arc<Version> {
        self.versions.read().expect("versions lock")[pin.0 as usize].clone()
    }

    fn probe(&self, text: &str) -> Result<Probe, SourceError> {
        let target = self.target(text)?;
        // Messages and logs name the source without its credentials.
        let what = redact(text);
        let version = self
            .rt()
            .block_on(remote::with_retries(&self.settings, &what, || {
                target.head(&what)
            }))?;
        let size = version.size;
        let identity = version.identity(text);
        let mut versions = self.versions.write().expect("versions lock");
        versions.push(Arc::new(version));
        Ok(Probe {
            size,
            pin: Pin(versions.len() as u64 - 1),
            identity,
        })
    }

    fn open(
        &self,
        text: &str,
        pin: Pin,
        range: std::ops::Range<u64>,
    ) -> Result<RemoteReader, SourceError> {
        let target = self.target(text)?;
        RemoteReader::open(
            self.rt().handle().clone(),
            target,
            &redact(text),
            self.version(pin),
            self.settings.clone(),
            range,
        )
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // A plain drop would wait for the runtime's tasks, and panics inside async contexts.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon runs jobs on tokio's blocking pool: the job's own runtime must start, block and
    /// shut down there without "runtime within a runtime" panics.
    #[test]
    fn remote_sources_work_from_a_blocking_task_of_another_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener); // connections to it are refused from now on
        let text = format!(
            "log_dir: l\nrules:\n  - name: a\n    watch: /dev\n    output_root: .\n    allow:\n      urls: [\"http://127.0.0.1:{port}/\"]\n    remote:\n      attempts: 1\n"
        );
        let rules = crate::config::parse(&text, &dir.path().join("r.yaml"), dir.path()).unwrap();
        let rule = rules.rules[0].clone();
        let outer = tokio::runtime::Runtime::new().unwrap();
        let err = outer.block_on(async move {
            tokio::task::spawn_blocking(move || {
                let sources = Sources::new(&rule).unwrap();
                let url = Location::Url(format!("http://127.0.0.1:{port}/x"));
                sources.probe(&url).unwrap_err()
            })
            .await
            .unwrap()
        });
        assert!(matches!(err, SourceError::Remote { .. }), "{err}");
        assert!(err.to_string().contains("1 attempt"), "{err}");
    }
}
