//! Where the bytes of a job land, and how they become visible: the output's face.
//!
//! Every kind of output does the same three things, in this order, and nothing else of the job
//! leaks into it: it checks where the output may go before any byte moves (a refusal is
//! [`OutputError::NotAllowed`]), it receives the bytes somewhere nobody reads yet, and it publishes
//! them in one atomic step — or not at all, leaving any earlier object untouched. [`local`] is the
//! local file: a hidden temporary file beside the output, published by `renameat2`. An object
//! store's multipart upload published by `CompleteMultipartUpload` is the next kind, beside it
//! in `output/s3.rs`; it shares [`OutputError`] (and so the error kinds the job maps from it)
//! but not the local file's temporary names, locks and renames.

use std::path::{Path, PathBuf};

use rustix::io::Errno;

pub mod local;
pub mod s3;

pub use local::*;

/// Why the output cannot be written or published.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output '{output}' is not allowed: {reason}")]
    NotAllowed { output: String, reason: String },
    #[error("output {} already exists (set overwrite to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("no space for output {} ({action}): {source}", path.display())]
    NoSpace {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The object store refused or failed a call on an S3 output (the store's status and code).
    #[error("output {url} ({action}): {reason}")]
    Store {
        url: String,
        action: &'static str,
        reason: String,
    },
    #[error("output {} ({action}): {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// An I/O failure on the output at `path`: [`OutputError::NoSpace`] when the disk is full.
pub fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> OutputError {
    let path = path.to_owned();
    if is_no_space(&source) {
        OutputError::NoSpace {
            path,
            action,
            source,
        }
    } else {
        OutputError::Io {
            path,
            action,
            source,
        }
    }
}

/// True for the errors that mean "the filesystem is full" (or the file too big for it).
pub fn is_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    // By kind too: an error passed on with its context keeps its kind, not its code.
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG)
    ) || matches!(
        e.kind(),
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge
    )
}
