//! What HTTP(S) and S3 sources share: the pinned version, retries with backoff, cancellation, and
//! a reader that resumes a broken transfer from the last byte received (or, where the server
//! ignores Range, from the start, skipping what it has: see also [`super::stream`]).
//!
//! Worker threads of the copy pass are plain blocking threads; each [`RemoteReader::read_at`] is
//! one `block_on` on the job's tokio runtime that fills the caller's whole buffer (up to 256 KiB)
//! from the response body, so the thread hop costs once per block, not once per network chunk.
//! Bytes go from the socket into that buffer and from there to the output at their offset: no
//! staging file, no whole-object buffer.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::SourceError;
use super::http::HttpClient;
use super::s3::S3Client;
use crate::config::RemoteConfig;

/// The version of a remote object seen by the planning pass; every ranged request is pinned to it.
#[derive(Debug, Clone, Default)]
pub struct Version {
    pub size: u64,
    /// A strong ETag (quoted, as sent): `If-Match` on every ranged request.
    pub etag: Option<String>,
    /// `Last-Modified`: `If-Unmodified-Since` when there is no strong ETag.
    pub last_modified: Option<String>,
    /// S3 version id, when the bucket is versioned.
    pub version_id: Option<String>,
}

impl Version {
    /// A fold of `url` and every validator, the same in every process (see `Probe::identity`).
    pub fn identity(&self, url: &str) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(b"remote\0").update(url.as_bytes()).update(b"\0");
        for v in [&self.etag, &self.last_modified, &self.version_id] {
            match v {
                Some(s) => h.update(b"+").update(s.as_bytes()).update(b"\0"),
                None => h.update(b"-"),
            };
        }
        h.update(&self.size.to_le_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

/// Why one attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// Retrying cannot help (404, 412, refused address, …).
    Permanent(SourceError),
    /// 5xx, 429, timeouts, dropped connections: retried with backoff.
    Transient(String),
    /// 429/503 with `Retry-After`: retried, waiting at least that long (capped at 30 s).
    Busy {
        reason: String,
        retry_after: Duration,
    },
}

/// A response body being received.
pub enum Body {
    Http(reqwest::Response),
    S3(aws_sdk_s3::primitives::ByteStream),
}

/// A response body that broke off (the cause, for messages; retried like a dropped connection).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Broken(String);

impl Body {
    pub(super) async fn next(&mut self) -> Option<Result<Bytes, Broken>> {
        match self {
            Self::Http(r) => r
                .chunk()
                .await
                .map_err(|e| Broken(describe(&e)))
                .transpose(),
            Self::S3(s) => s.next().await.map(|r| r.map_err(|e| Broken(describe(&e)))),
        }
    }
}

/// `e` with its causes, for messages.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    // Client errors quote the URL they were sending to.
    super::redact(&text).into_owned()
}

/// The job's cancel flag as remote waits see it: every wait on the network (a request, a body,
/// a backoff pause) ends within [`Cancel::POLL`] once it is set.
#[derive(Clone, Copy, Default)]
pub struct Cancel<'a>(pub Option<&'a AtomicBool>);

impl Cancel<'_> {
    /// How often a wait looks at the flag.
    pub const POLL: Duration = Duration::from_millis(20);

    pub fn is_set(self) -> bool {
        self.0.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Resolves once the flag is set (never, without one).
    async fn set(self) {
        match self.0 {
            None => std::future::pending().await,
            Some(_) => {
                while !self.is_set() {
                    tokio::time::sleep(Self::POLL).await;
                }
            }
        }
    }

    /// The error of a wait the flag ended.
    pub fn error(what: &str) -> SourceError {
        SourceError::Cancelled {
            what: what.to_owned(),
        }
    }
}

/// Run `fut` on `rt` from a blocking thread, giving up with `Cancelled` as soon as `cancel` is set
/// (the future is dropped, which closes its connection).
pub fn block_on<T>(
    rt: &tokio::runtime::Handle,
    cancel: Cancel<'_>,
    what: &str,
    fut: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    if cancel.is_set() {
        return Err(Cancel::error(what));
    }
    rt.block_on(async {
        tokio::select! {
            r = fut => r,
            () = cancel.set() => Err(Cancel::error(what)),
        }
    })
}

/// A response on its way: the body, and whether the server sent the whole object instead of the
/// range asked for (a server that ignores Range answers 200 with every byte).
pub struct Fetched {
    pub body: Body,
    pub whole_object: bool,
}

/// Where a remote object lives.
#[derive(Clone)]
pub enum Target {
    Http {
        client: Arc<HttpClient>,
        url: reqwest::Url,
    },
    S3 {
        client: Arc<S3Client>,
        bucket: String,
        key: String,
    },
}

impl Target {
    /// Learn size and version (one attempt).
    pub async fn head(&self, what: &str) -> Result<Version, Failure> {
        match self {
            Self::Http { client, url } => client.head(url, what).await,
            Self::S3 {
                client,
                bucket,
                key,
            } => client.head(bucket, key, what).await,
        }
    }

    /// Start receiving `range` of `version` (one attempt).
    pub async fn get(
        &self,
        what: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<Fetched, Failure> {
        match self {
            Self::Http { client, url } => client.get(url, what, version, range).await,
            Self::S3 {
                client,
                bucket,
                key,
            } => Ok(Fetched {
                body: client.get(bucket, key, what, version, range).await?,
                whole_object: false,
            }),
        }
    }
}

/// Delay before retry number `failures` (1-based): `base · 2^(failures-1)`, capped at 30 s, with
/// "equal jitter" (half fixed, half random) so parallel workers do not retry in lockstep.
pub fn backoff(base: Duration, failures: u32) -> Duration {
    let exp = base.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let capped = exp.min(Duration::from_secs(30));
    let half = capped / 2;
    half + half.mul_f64(random_unit())
}

/// A number in [0, 1) from the standard library's randomly keyed hasher (no `rand` dependency
/// for one jitter value).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Run `op` until it succeeds, fails permanently, or `settings.attempts` are spent.
pub async fn with_retries<T, F, Fut>(
    settings: &RemoteConfig,
    what: &str,
    mut op: F,
) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut failures = 0;
    loop {
        match tokio::time::timeout(settings.idle_timeout, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(Failure::Permanent(e))) => return Err(e),
            Ok(Err(Failure::Transient(reason))) => {
                failures += 1;
                give_up_or_wait(settings, what, failures, reason, None).await?;
            }
            Ok(Err(Failure::Busy {
                reason,
                retry_after,
            })) => {
                failures += 1;
                give_up_or_wait(settings, what, failures, reason, Some(retry_after)).await?;
            }
            Err(_) => {
                failures += 1;
                let reason = format!("no answer within {}", ms(settings.idle_timeout));
                give_up_or_wait(settings, what, failures, reason, None).await?;
            }
        }
    }
}

/// What one request of a transfer (the first, or a reconnection) came to.
pub(super) enum Request {
    Answered(Fetched),
    /// The server was busy and its wait is over (counted in the failures): ask again.
    Again,
    /// A transient failure, to be counted and retried by the caller.
    Failed(String),
}

/// Send `get` and wait at most `idle_timeout` for its answer. A permanent failure ends the
/// transfer; a busy answer is waited out here (as long as it asks, within `attempts`).
pub(super) async fn request(
    settings: &RemoteConfig,
    what: &str,
    failures: &mut u32,
    get: impl std::future::Future<Output = Result<Fetched, Failure>>,
) -> Result<Request, SourceError> {
    let idle = settings.idle_timeout;
    match tokio::time::timeout(idle, get).await {
        Ok(Ok(fetched)) => Ok(Request::Answered(fetched)),
        Ok(Err(Failure::Permanent(e))) => Err(e),
        Ok(Err(Failure::Transient(reason))) => Ok(Request::Failed(reason)),
        Ok(Err(Failure::Busy {
            reason,
            retry_after,
        })) => {
            *failures += 1;
            give_up_or_wait(settings, what, *failures, reason, Some(retry_after)).await?;
            Ok(Request::Again)
        }
        Err(_) => Ok(Request::Failed(format!("no answer within {}", ms(idle)))),
    }
}

pub(super) async fn give_up_or_wait(
    settings: &RemoteConfig,
    what: &str,
    failures: u32,
    reason: String,
    retry_after: Option<Duration>,
) -> Result<(), SourceError> {
    if failures >= settings.attempts {
        return Err(SourceError::Remote {
            what: what.to_owned(),
            reason: format!("gave up after {failures} attempt(s); last: {reason}"),
        });
    }
    if let Some(rule) = crate::logging::current_rule() {
        crate::metrics::remote_retry(&rule);
    }
    let hint = retry_after.map_or(Duration::ZERO, |d| d.min(Duration::from_secs(30)));
    let wait = backoff(settings.backoff, failures).max(hint);
    tracing::warn!(
        source = what,
        attempt = failures,
        wait = %ms(wait),
        "{reason}; retrying"
    );
    tokio::time::sleep(wait).await;
    Ok(())
}

struct State {
    body: Option<Body>,
    /// Source offset of the next byte `body` will deliver (before `pos` when a server that
    /// ignores Range resent the object from its start: those bytes are skipped).
    body_pos: u64,
    /// `body` is the whole object, not the range asked for: stop at `end`, do not complain.
    body_whole: bool,
    /// Next source offset to hand out.
    pos: u64,
    /// Received but not yet handed out.
    pending: Bytes,
    /// Failed attempts of this transfer after it was opened.
    failures: u32,
}

/// What a transfer of one pinned remote object reads, and how: shared by [`RemoteReader`] and
/// the object's [`Stream`](super::stream::Stream).
pub struct Origin {
    pub rt: tokio::runtime::Handle,
    pub target: Target,
    /// The source as the logs show it (credentials redacted).
    pub what: String,
    pub version: Arc<Version>,
    pub settings: RemoteConfig,
}

/// One ranged transfer of a remote source, read in order.
pub struct RemoteReader {
    origin: Origin,
    end: u64,
    state: Mutex<State>,
}

impl RemoteReader {
    /// A reader of `range` whose first response, `first`, is already there (it was sent at open,
    /// so refusals such as a changed object surface at open).
    pub fn new(origin: Origin, range: Range<u64>, first: Option<Fetched>) -> Self {
        let body_whole = first.as_ref().is_some_and(|f| f.whole_object);
        Self {
            origin,
            end: range.end,
            state: Mutex::new(State {
                body_pos: if body_whole { 0 } else { range.start },
                body: first.map(|f| f.body),
                body_whole,
                pos: range.start,
                pending: Bytes::new(),
                failures: 0,
            }),
        }
    }

    /// Fill `buf` with the bytes at `offset`, which must be where the previous read ended.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        cancel: Cancel<'_>,
    ) -> Result<usize, SourceError> {
        let mut st = self.state.lock().expect("reader lock");
        if offset != st.pos {
            return Err(self.protocol(&format!(
                "remote sources are read in order: asked for {offset}, at {}",
                st.pos
            )));
        }
        block_on(
            &self.origin.rt,
            cancel,
            &self.origin.what,
            self.fill(&mut st, buf),
        )
    }

    async fn fill(&self, st: &mut State, buf: &mut [u8]) -> Result<usize, SourceError> {
        let mut n = 0;
        while n < buf.len() && st.pos < self.end {
            if !st.pending.is_empty() {
                let take = st.pending.len().min(buf.len() - n);
                buf[n..n + take].copy_from_slice(&st.pending.split_to(take));
                n += take;
                st.pos += take as u64;
                continue;
            }
            let idle = self.origin.settings.idle_timeout;
            let reason = match st.body.as_mut() {
                // Resume from the last byte received, still pinned to the planned version; a
                // server that ignores Range starts again from byte 0, and we skip to `pos`.
                None => {
                    let get = self.origin.target.get(
                        &self.origin.what,
                        &self.origin.version,
                        st.pos..self.end,
                    );
                    match request(
                        &self.origin.settings,
                        &self.origin.what,
                        &mut st.failures,
                        get,
                    )
                    .await?
                    {
                        Request::Answered(fetched) => {
                            st.body_whole = fetched.whole_object;
                            st.body_pos = if fetched.whole_object { 0 } else { st.pos };
                            st.body = Some(fetched.body);
                            continue;
                        }
                        Request::Again => continue,
                        Request::Failed(reason) => reason,
                    }
                }
                Some(body) => match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(mut bytes))) => {
                        // Bytes before `pos` were handed out by an earlier response: skip them.
                        let skip = (st.pos - st.body_pos).min(bytes.len() as u64);
                        st.body_pos += bytes.len() as u64;
                        let _ = bytes.split_to(skip as usize);
                        if st.body_pos > self.end {
                            if !st.body_whole {
                                return Err(
                                    self.protocol("sent more bytes than the range asked for")
                                );
                            }
                            bytes.truncate((self.end - st.pos) as usize);
                            st.body = None;
                        }
                        st.pending = bytes;
                        continue;
                    }
                    Ok(Some(Err(e))) => format!("transfer broke at byte {}: {e}", st.body_pos),
                    Ok(None) => format!("connection closed early, at byte {}", st.body_pos),
                    Err(_) => format!(
                        "timed out: no data for {} at byte {}",
                        ms(idle),
                        st.body_pos
                    ),
                },
            };
            st.body = None;
            // Bounded per transfer (one ranged request of at most `chunk_size`): a server that
            // keeps breaking is given up on even if each attempt brings a few bytes.
            st.failures += 1;
            give_up_or_wait(
                &self.origin.settings,
                &self.origin.what,
                st.failures,
                reason,
                None,
            )
            .await?;
        }
        if st.pos == self.end
            && !st.body_whole
            && let Some(mut body) = st.body.take()
        {
            // Read to the end of the response so the connection can be reused, and make sure the
            // server sent no more than it promised.
            if let Ok(Some(Ok(extra))) =
                tokio::time::timeout(self.origin.settings.idle_timeout, body.next()).await
                && !extra.is_empty()
            {
                return Err(self.protocol("sent more bytes than the range asked for"));
            }
        }
        Ok(n)
    }

    fn protocol(&self, reason: &str) -> SourceError {
        SourceError::Remote {
            what: self.origin.what.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Where this transfer ends.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// A duration for messages: `400ms`, `2s`.
pub fn ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let base = Duration::from_millis(100);
        for k in 1..6 {
            let full = base * (1 << (k - 1));
            let d = backoff(base, k);
            assert!(d >= full / 2 && d <= full, "{k}: {d:?}");
        }
        assert!(backoff(base, 40) <= Duration::from_secs(30));
    }
}
