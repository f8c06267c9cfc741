//! Sources: one face for every place bytes come from.
//!
//! A job touches each source twice. The planning pass [`Sources::probe`]s it — is it allowed, does
//! it exist, is it a regular object, how long is it — and records a [`Pin`] of what it saw. The copy
//! pass [`Sources::open`]s it again and refuses it (`source_changed`) unless it is still the object
//! that was planned, so a file swapped or rewritten between the passes never splices foreign bytes
//! into the output. Only local files exist here so far; `http`/`s3` come with the remote issue.

pub mod local;

use std::io::Read;
use std::os::fd::BorrowedFd;

use crate::config::Rule;
use crate::manifest::Location;

pub use local::LocalFile;

/// Identity of a source as the planning pass saw it (for a local file: device, inode, size and
/// modification time folded into one number). Compared again when the source is opened for copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pin(pub u64);

/// What the planning pass learns about a source.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The whole object's length in bytes.
    pub size: u64,
    pub pin: Pin,
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
}

/// An opened source, ready to be read at any offset from any thread.
pub enum Reader {
    Local(LocalFile),
}

impl Reader {
    /// Read into `buf` from `offset` of the source; short reads are possible, 0 means end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Self::Local(f) => f.read_at(buf, offset),
        }
    }

    /// The file descriptor, where the source is a local file (for `copy_file_range`).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Local(f) => Some(f.fd()),
        }
    }
}

/// Every place a rule may take sources from, with its allow policy.
pub struct Sources {
    local: local::LocalResolver,
}

impl Sources {
    /// Set up the resolvers for one job of `rule`.
    pub fn new(rule: &Rule) -> Result<Self, SourceError> {
        Ok(Self {
            local: local::LocalResolver::new(rule.source_root.as_deref(), &rule.allow.paths)?,
        })
    }

    /// Check that a source is allowed, exists and is a regular object; learn its size and pin.
    pub fn probe(&self, location: &Location) -> Result<Probe, SourceError> {
        match location {
            Location::Path(p) => self.local.probe(p),
            Location::Url(u) => Err(unsupported(u)),
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
        let _ = &range;
        match location {
            Location::Path(p) => self.local.open(p, pin).map(Reader::Local),
            Location::Url(u) => Err(unsupported(u)),
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
                let pin = expected.unwrap_or(self.local.probe(p)?.pin);
                let file = self.local.open(p, pin)?;
                Ok((Box::new(file.into_reader()), pin))
            }
            Location::Url(u) => Err(unsupported(u)),
        }
    }
}

fn unsupported(url: &str) -> SourceError {
    SourceError::NotAllowed {
        what: url.to_owned(),
        reason: "remote sources are not supported by this build".into(),
    }
}
