//! What HTTP(S) and S3 sources share: the pinned version, retries with backoff, and a reader that
//! resumes a broken transfer from the last byte received.
//!
//! Worker threads of the copy pass are plain blocking threads; each [`RemoteReader::read_at`] is
//! one `block_on` on the job's tokio runtime that fills the caller's whole buffer (up to 256 KiB)
//! from the response body, so the thread hop costs once per block, not once per network chunk.
//! Bytes go from the socket into that buffer and from there to the output at their offset: no
//! staging file, no whole-object buffer.

use std::ops::Range;
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

impl Body {
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        match self {
            Self::Http(r) => r.chunk().await.map_err(|e| describe(&e)).transpose(),
            Self::S3(s) => s.next().await.map(|r| r.map_err(|e| describe(&e))),
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
    ) -> Result<Body, Failure> {
        match self {
            Self::Http { client, url } => client.get(url, what, version, range).await,
            Self::S3 {
                client,
                bucket,
                key,
            } => client.get(bucket, key, what, version, range).await,
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
                let reason = format!("no answer within {:?}", settings.idle_timeout);
                give_up_or_wait(settings, what, failures, reason, None).await?;
            }
        }
    }
}

async fn give_up_or_wait(
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
    let hint = retry_after.map_or(Duration::ZERO, |d| d.min(Duration::from_secs(30)));
    let wait = backoff(settings.backoff, failures).max(hint);
    tracing::warn!(
        source = what,
        attempt = failures,
        ?wait,
        "{reason}; retrying"
    );
    tokio::time::sleep(wait).await;
    Ok(())
}

struct State {
    body: Option<Body>,
    /// Next source offset to hand out.
    pos: u64,
    /// Received but not yet handed out.
    pending: Bytes,
    /// Failed attempts of this transfer after it was opened.
    failures: u32,
}

/// One ranged transfer of a remote source, read in order.
pub struct RemoteReader {
    rt: tokio::runtime::Handle,
    target: Target,
    what: String,
    version: Arc<Version>,
    settings: RemoteConfig,
    end: u64,
    state: Mutex<State>,
}

impl RemoteReader {
    /// Send the first request for `range` (retrying as configured), so refusals such as a changed
    /// object surface here, at open.
    pub fn open(
        rt: tokio::runtime::Handle,
        target: Target,
        what: &str,
        version: Arc<Version>,
        settings: RemoteConfig,
        range: Range<u64>,
    ) -> Result<Self, SourceError> {
        let body = if range.is_empty() {
            None
        } else {
            Some(rt.block_on(with_retries(&settings, what, || {
                target.get(what, &version, range.clone())
            }))?)
        };
        Ok(Self {
            rt,
            target,
            what: what.to_owned(),
            version,
            settings,
            end: range.end,
            state: Mutex::new(State {
                body,
                pos: range.start,
                pending: Bytes::new(),
                failures: 0,
            }),
        })
    }

    /// Fill `buf` with the bytes at `offset`, which must be where the previous read ended.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut st = self.state.lock().expect("reader lock");
        if offset != st.pos {
            return Err(std::io::Error::other(format!(
                "remote sources are read in order: asked for {offset}, at {}",
                st.pos
            )));
        }
        self.rt
            .block_on(self.fill(&mut st, buf))
            .map_err(std::io::Error::other)
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
            let idle = self.settings.idle_timeout;
            let reason = match st.body.as_mut() {
                // Resume from the last byte received, still pinned to the planned version.
                None => {
                    let get = self.target.get(&self.what, &self.version, st.pos..self.end);
                    match tokio::time::timeout(idle, get).await {
                        Ok(Ok(body)) => {
                            st.body = Some(body);
                            continue;
                        }
                        Ok(Err(Failure::Permanent(e))) => return Err(e),
                        Ok(Err(Failure::Transient(reason))) => reason,
                        Ok(Err(Failure::Busy {
                            reason,
                            retry_after,
                        })) => {
                            st.failures += 1;
                            let n = st.failures;
                            give_up_or_wait(
                                &self.settings,
                                &self.what,
                                n,
                                reason,
                                Some(retry_after),
                            )
                            .await?;
                            continue;
                        }
                        Err(_) => format!("no answer within {idle:?}"),
                    }
                }
                Some(body) => match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(bytes))) => {
                        if bytes.len() as u64 > self.end - st.pos {
                            return Err(self.protocol("sent more bytes than the range asked for"));
                        }
                        st.pending = bytes;
                        continue;
                    }
                    Ok(Some(Err(e))) => format!("transfer broke at byte {}: {e}", st.pos),
                    Ok(None) => format!("connection closed early, at byte {}", st.pos),
                    Err(_) => format!("timed out: no data for {idle:?} at byte {}", st.pos),
                },
            };
            st.body = None;
            // Bounded per transfer (one ranged request of at most `chunk_size`): a server that
            // keeps breaking is given up on even if each attempt brings a few bytes.
            st.failures += 1;
            give_up_or_wait(&self.settings, &self.what, st.failures, reason, None).await?;
        }
        if st.pos == self.end
            && let Some(mut body) = st.body.take()
        {
            // Read to the end of the response so the connection can be reused, and make sure the
            // server sent no more than it promised.
            if let Ok(Some(Ok(extra))) =
                tokio::time::timeout(self.settings.idle_timeout, body.next()).await
                && !extra.is_empty()
            {
                return Err(self.protocol("sent more bytes than the range asked for"));
            }
        }
        Ok(n)
    }

    fn protocol(&self, reason: &str) -> SourceError {
        SourceError::Remote {
            what: self.what.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// A whole remote object as a `Read` (source lists).
pub struct SequentialReader {
    pub reader: RemoteReader,
    pub pos: u64,
}

impl std::io::Read for SequentialReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.reader.end || buf.is_empty() {
            return Ok(0);
        }
        let n = self.reader.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
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
