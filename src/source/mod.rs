//! Sources: one face for every place bytes come from.
//!
//! A job touches each source twice. The planning pass [`Sources::probe`]s it — is it allowed, does
//! it exist, is it a regular object, how long is it — and records a [`Pin`] of what it saw. The copy
//! pass [`Sources::open`]s it again and refuses it (`source_changed`) unless it is still the object
//! that was planned, so a file swapped or rewritten between the passes never splices foreign bytes
//! into the output. Remote sources (`http(s)://`, `s3://`) live in [`remote`], [`http`] and
//! [`s3`], behind the allow policy of [`policy`]; their machinery (a tokio runtime, clients) is
//! set up on the first URL a job meets, so local-only jobs pay nothing for it.

pub mod clients;
pub mod http;
pub mod local;
pub mod policy;
pub mod remote;
pub mod s3;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::config::Rule;
use crate::manifest::Location;

pub use crate::redact::{Redacted, redact};
use clients::{Clients, SetupError};
pub use local::LocalFile;
pub use remote::Version;
use remote::{Cancel, RemoteReader, Target};
use stream::{Stream, StreamReader};

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
    /// The object's length differs from the planned one.
    #[error("{what}: changed while the job ran (it now has {now} bytes, not {planned})")]
    SizeChanged {
        what: String,
        planned: u64,
        now: u64,
    },
    /// A remote source failed for good (the message names the URL and the HTTP status).
    #[error("{what}: {reason}")]
    Remote { what: String, reason: String },
    /// A response announced another length than the bytes asked for.
    #[error("{what}: Content-Length {got} for a range of {wanted} bytes")]
    LengthMismatch { what: String, wanted: u64, got: u64 },
    /// No S3 client for this rule: missing credentials or region (not retried).
    #[error("{what}: {source}")]
    S3Setup {
        what: String,
        #[source]
        source: s3::S3Setup,
    },
    /// The rule's network machinery could not be built (concatd's own trouble).
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: SetupError,
    },
    /// The job's cancel flag ended a wait on the network.
    #[error("{what}: cancelled")]
    Cancelled { what: String },
}

/// An opened source, ready to be read at any offset from any thread.
pub enum Reader<'a> {
    Local(LocalFile),
    /// One transfer of an HTTP(S) or S3 object: read it in order.
    Remote {
        reader: RemoteRead,
        cancel: Cancel<'a>,
    },
}

/// A remote transfer: its own ranged request, or a range of the object's one [`Stream`].
pub enum RemoteRead {
    Ranged(Box<RemoteReader>),
    Stream(StreamReader),
}

impl RemoteRead {
    fn read(&self, buf: &mut [u8], offset: u64, cancel: Cancel<'_>) -> Result<usize, SourceError> {
        match self {
            Self::Ranged(r) => r.read(buf, offset, cancel),
            Self::Stream(r) => r.read(buf, offset, cancel),
        }
    }

    fn end(&self) -> u64 {
        match self {
            Self::Ranged(r) => r.end(),
            Self::Stream(r) => r.end(),
        }
    }
}

impl Reader<'_> {
    /// Read into `buf` from `offset` of the source; short reads are possible, 0 means end.
    /// `what` names the source in errors of local files (remote readers know their URL).
    pub fn read_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        what: &dyn std::fmt::Display,
    ) -> Result<usize, SourceError> {
        match self {
            Self::Local(f) => loop {
                match f.read_at(buf, offset) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => {
                        return r.map_err(|source| SourceError::ReadFailed {
                            what: what.to_string(),
                            source,
                        });
                    }
                }
            },
            Self::Remote { reader, cancel } => reader.read(buf, offset, *cancel),
        }
    }

    /// After a range was read: refuse a local file that changed meanwhile (see
    /// [`LocalFile::recheck`]). Remote reads are pinned per request (`If-Match`), so they pass.
    pub fn recheck(&self) -> Result<(), SourceError> {
        match self {
            Self::Local(f) => f.recheck(),
            Self::Remote { .. } => Ok(()),
        }
    }

    /// The file descriptor, where the source is a local file (for `copy_file_range`).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Local(f) => Some(f.fd()),
            Self::Remote { .. } => None,
        }
    }
}

/// Every place a rule may take sources from, with its allow policy, for one job.
pub struct Sources<'a> {
    local: local::LocalResolver,
    rule: Rule,
    cancel: Cancel<'a>,
    remote: OnceLock<Remote>,
}

impl Sources<'static> {
    /// Set up the resolvers for one job of `rule` that nothing cancels (`concatd plan`).
    pub fn new(rule: &Rule) -> Result<Self, SourceError> {
        Sources::with_cancel(rule, None)
    }
}

impl<'a> Sources<'a> {
    /// Set up the resolvers for one job of `rule`; once `cancel` is set, every wait on the network
    /// ends (within tens of milliseconds) with [`SourceError::Cancelled`].
    pub fn with_cancel(rule: &Rule, cancel: Option<&'a AtomicBool>) -> Result<Self, SourceError> {
        Ok(Self {
            local: local::LocalResolver::new(rule.source_root.as_deref(), &rule.allow.paths)?,
            rule: rule.clone(),
            cancel: Cancel(cancel),
            remote: OnceLock::new(),
        })
    }

    /// The job's remote state over the rule's shared clients, set up on first use.
    fn remote(&self, what: &str) -> Result<&Remote, SourceError> {
        if let Some(r) = self.remote.get() {
            return Ok(r);
        }
        let clients = Clients::for_rule(&self.rule).map_err(|source| SourceError::Setup {
            what: redact(what).into_owned(),
            source,
        })?;
        Ok(self.remote.get_or_init(|| Remote::new(clients)))
    }

    /// The rule's shared network clients (an S3 output uses the rule's S3 client and runtime:
    /// it lives in the store of the rule's `s3://` sources).
    pub fn clients(&self, what: &str) -> Result<Arc<Clients>, SourceError> {
        Ok(self.remote(what)?.clients.clone())
    }

    /// Check that a source is allowed, exists and is a regular object; learn its size and pin.
    pub fn probe(&self, location: &Location) -> Result<Probe, SourceError> {
        match location {
            Location::Path(p) => self.local.probe(p),
            Location::Url(u) => self.remote(u)?.probe(u, self.cancel),
        }
    }

    /// What the pin of a planned source stands for (`concatd plan`): a local file's resolved
    /// path and identity (`None` if it is no longer the file pinned), a remote object's
    /// validators.
    pub fn describe(&self, location: &Location, pin: Pin) -> Option<PinDetail> {
        match location {
            Location::Path(p) => self.local.describe(p, pin).map(PinDetail::Local),
            Location::Url(_) => {
                let remote = self.remote.get()?;
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
    ) -> Result<Reader<'a>, SourceError> {
        match location {
            Location::Path(p) => self.local.open(p, pin).map(Reader::Local),
            Location::Url(u) => Ok(Reader::Remote {
                reader: self.remote(u)?.open(u, pin, range, self.cancel)?,
                cancel: self.cancel,
            }),
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
                    None => remote.probe(u, self.cancel)?.pin,
                };
                let size = remote.version(pin).size;
                // A list is read by the manifest's parser as a plain `Read`, which outlives
                // this borrow of the cancel flag: its reads are bounded by the timeouts instead.
                let reader = remote.open(u, pin, 0..size, Cancel::default())?;
                Ok((Box::new(ListReader { reader, pos: 0 }), pin))
            }
        }
    }
}

/// A whole remote object as a `Read` (source lists).
struct ListReader {
    reader: RemoteRead,
    pos: u64,
}

impl Read for ListReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.reader.end() || buf.is_empty() {
            return Ok(0);
        }
        // The parser reports read errors by their message: it names the URL and the cause.
        let n = self
            .reader
            .read(buf, self.pos, Cancel::default())
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A job's remote sources: the rule's shared clients, and the versions this job pinned.
struct Remote {
    clients: Arc<Clients>,
    /// `Pin(n)` of a remote source is `versions[n]`.
    versions: RwLock<Vec<Arc<Version>>>,
    /// Objects whose server ignores Range, by pin: every piece is served from one stream.
    streams: Mutex<HashMap<u64, Arc<Stream>>>,
    /// Pins a server answered a range for (206): their pieces go out in parallel.
    ranged: Mutex<HashSet<u64>>,
    /// Until a pin is known to be ranged or not, its first request goes out alone: workers that
    /// open other pieces of it meanwhile wait for that answer instead of each sending a GET that
    /// a server ignoring Range would answer with the whole object.
    first: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
}

impl Remote {
    fn new(clients: Arc<Clients>) -> Self {
        Self {
            clients,
            versions: RwLock::new(Vec::new()),
            streams: Mutex::new(HashMap::new()),
            ranged: Mutex::new(HashSet::new()),
            first: Mutex::new(HashMap::new()),
        }
    }

    /// Check the URL against the policy and find out who serves it.
    fn target(&self, text: &str) -> Result<Target, SourceError> {
        let refused = |reason: String| SourceError::NotAllowed {
            what: redact(text).into_owned(),
            reason,
        };
        let url = self.clients.policy.check(text).map_err(|e| refused(e.0))?;
        match url.scheme() {
            "http" | "https" => Ok(Target::Http {
                client: self.clients.http.clone(),
                url,
            }),
            "s3" => {
                let (bucket, key) = crate::config::urls::bucket_and_key(&url)
                    .ok_or_else(|| refused("an s3 URL needs a bucket and a key".into()))?;
                Ok(Target::S3 {
                    client: self.clients.s3(&redact(text))?,
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

    fn probe(&self, text: &str, cancel: Cancel<'_>) -> Result<Probe, SourceError> {
        let target = self.target(text)?;
        // Messages and logs name the source without its credentials.
        let what = redact(text);
        let settings = &self.clients.settings;
        let version = remote::block_on(
            self.clients.rt(),
            cancel,
            &what,
            remote::with_retries(settings, &what, || target.head(&what)),
        )?;
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
        cancel: Cancel<'_>,
    ) -> Result<RemoteRead, SourceError> {
        let known = self.ranged.lock().expect("ranged lock").contains(&pin.0);
        let first = (!known).then(|| {
            let mut first = self.first.lock().expect("first lock");
            first.entry(pin.0).or_default().clone()
        });
        let _alone = first
            .as_ref()
            .map(|m| m.lock().expect("first request lock"));
        if let Some(stream) = self.streams.lock().expect("streams lock").get(&pin.0)
            && let Some(reader) = stream.reader(range.clone())
        {
            return Ok(RemoteRead::Stream(reader));
        }
        let target = self.target(text)?;
        let what = redact(text);
        let version = self.version(pin);
        let settings = &self.clients.settings;
        let first = if range.is_empty() {
            None
        } else {
            Some(remote::block_on(
                self.clients.rt(),
                cancel,
                &what,
                remote::with_retries(settings, &what, || {
                    target.get(&what, &version, range.clone())
                }),
            )?)
        };
        let origin = remote::Origin {
            rt: self.clients.rt().clone(),
            target,
            what: what.into_owned(),
            version,
            settings: settings.clone(),
        };
        let what = &origin.what;
        let first = match first {
            Some(fetched) if fetched.whole_object => {
                // Registered while the map is locked, so no other piece's reader can skip past
                // this one's bytes before it is counted.
                let mut streams = self.streams.lock().expect("streams lock");
                if let Some(stream) = streams.get(&pin.0) {
                    if let Some(reader) = stream.reader(range.clone()) {
                        return Ok(RemoteRead::Stream(reader));
                    }
                    // Too late for the object's stream: this response serves this range alone.
                    tracing::debug!(source = %what, at = range.start, "a piece opened after the stream passed it");
                    Some(fetched)
                } else {
                    tracing::info!(
                        source = %what, bytes = origin.version.size,
                        "the server ignores Range requests: reading the object as one stream, its \
                         pieces in order"
                    );
                    let stream = Arc::new(Stream::new(origin, fetched));
                    streams.insert(pin.0, stream.clone());
                    let reader = stream.reader(range).expect("a new stream is at byte 0");
                    return Ok(RemoteRead::Stream(reader));
                }
            }
            first => {
                if first.is_some() && self.ranged.lock().expect("ranged lock").insert(pin.0) {
                    tracing::debug!(source = %what, "the server answers ranges: parallel requests");
                }
                first
            }
        };
        Ok(RemoteRead::Ranged(Box::new(RemoteReader::new(
            origin, range, first,
        ))))
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
