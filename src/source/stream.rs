//! One object, one sequential stream: the fallback for servers that ignore Range.
//!
//! The copy pass cuts a remote object into `chunk_size` pieces and hands them to parallel workers,
//! one ranged GET each. A server that ignores Range (python's `http.server`, simple CDNs) answers
//! every one of those with 200 and the whole body: N pieces would cost N whole-object transfers
//! (for 1 GiB in 8 MiB pieces, about 64 GiB). So after the first 200-to-a-range the job keeps that
//! response as the object's [`Stream`], and every piece of the object is served from it, in order:
//! a worker whose piece starts further on waits while another worker still needs the bytes before
//! it, and bytes nobody asked for (before the manifest's `offset`, or of a piece an earlier run
//! finished) are read and dropped. One GET for the whole object, pinned like a ranged one.
//!
//! A dropped connection asks again from the byte it broke at; a server that ignores Range sends
//! the object from its start again (within `remote.attempts`), and the bytes already handed out
//! are skipped. Progress never depends on which worker gets the lock first: the reader furthest
//! behind never waits, so it always moves the stream on.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::SourceError;
use super::remote::{Body, Cancel, Fetched, Origin, Request, block_on, give_up_or_wait, request};

/// How long a waiting reader sleeps before it looks at the cancel flag again.
const WAIT: Duration = Duration::from_millis(20);
/// How long bytes that no open reader needs are kept before they are dropped: the reader of the
/// piece before this one may be a moment late to open (it was handed out first, but workers run
/// at their own pace). Dropping them anyway costs a restart from byte 0, never wrong bytes.
const GRACE: Duration = Duration::from_millis(200);

/// The shared sequential transfer of one pinned object.
pub struct Stream {
    origin: Origin,
    state: Mutex<State>,
    moved: Condvar,
}

struct State {
    body: Option<Body>,
    /// Source offset of `pending[0]` (of the next byte the body delivers, when `pending` is empty).
    pos: u64,
    pending: Bytes,
    failures: u32,
    /// Open readers: their next offset and their end.
    readers: HashMap<u64, (u64, u64)>,
    next_id: u64,
}

impl Stream {
    /// The stream of `version`, starting with `first`, a response holding the whole object.
    pub fn new(origin: Origin, first: Fetched) -> Self {
        Self {
            origin,
            state: Mutex::new(State {
                body: Some(first.body),
                pos: 0,
                pending: Bytes::new(),
                failures: 0,
                readers: HashMap::new(),
                next_id: 0,
            }),
            moved: Condvar::new(),
        }
    }

    /// A reader of `range` of the object, served from this stream; `None` when the stream has
    /// passed the range's start already (that reader then makes its own request, so the
    /// readers keeping up are not sent back to byte 0).
    pub fn reader(self: &Arc<Self>, range: std::ops::Range<u64>) -> Option<StreamReader> {
        let mut st = self.lock();
        if st.pos > range.start {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.readers.insert(id, (range.start, range.end));
        Some(StreamReader {
            stream: self.clone(),
            id,
            end: range.end,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("stream lock")
    }

    fn read(
        &self,
        id: u64,
        buf: &mut [u8],
        offset: u64,
        end: u64,
        cancel: Cancel<'_>,
    ) -> Result<usize, SourceError> {
        let mut st = self.lock();
        let mut skip_after = None;
        loop {
            if cancel.is_set() {
                return Err(Cancel::error(&self.origin.what));
            }
            if st.pos > offset {
                // This reader came late (it opened after its bytes went by): start over.
                tracing::debug!(source = %self.origin.what, at = offset, "stream passed a reader: restarting it");
                st.body = None;
                st.pending = Bytes::new();
                st.pos = 0;
            }
            if st.pos == offset && !st.pending.is_empty() {
                let take = st.pending.len().min(buf.len()).min((end - offset) as usize);
                buf[..take].copy_from_slice(&st.pending.split_to(take));
                st.pos += take as u64;
                let next = st.pos;
                st.readers.insert(id, (next, end));
                self.moved.notify_all();
                return Ok(take);
            }
            if st.pos < offset {
                let pos = st.pos;
                let needed = st
                    .readers
                    .iter()
                    .any(|(&other, &(next, end))| other != id && next < offset && end > pos);
                let early =
                    *skip_after.get_or_insert_with(|| Instant::now() + GRACE) > Instant::now();
                if needed || early {
                    st = self.moved.wait_timeout(st, WAIT).expect("stream lock").0;
                    continue;
                }
                if !st.pending.is_empty() {
                    let drop = st.pending.len().min((offset - pos) as usize);
                    let _ = st.pending.split_to(drop);
                    st.pos += drop as u64;
                    continue;
                }
            }
            // Nothing pending at the stream's position: receive more (other readers wait).
            let st_ref = &mut *st;
            block_on(
                &self.origin.rt,
                cancel,
                &self.origin.what,
                self.receive(st_ref),
            )?;
        }
    }

    /// Receive the next bytes into `pending`, reconnecting (with retries) when needed.
    async fn receive(&self, st: &mut State) -> Result<(), SourceError> {
        let idle = self.origin.settings.idle_timeout;
        loop {
            let reason = match st.body.as_mut() {
                None => {
                    if st.pos >= self.origin.version.size {
                        return Err(SourceError::Changed {
                            what: self.origin.what.clone(),
                            reason: format!("it ended at byte {}, before the planned end", st.pos),
                        });
                    }
                    let get = self.origin.target.get(
                        &self.origin.what,
                        &self.origin.version,
                        st.pos..self.origin.version.size,
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
                            // A server that can resume answers the range; one that cannot sends
                            // the object from byte 0 again.
                            if fetched.whole_object {
                                st.pos = 0;
                            }
                            st.body = Some(fetched.body);
                            continue;
                        }
                        Request::Again => continue,
                        Request::Failed(reason) => reason,
                    }
                }
                Some(body) => match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(bytes))) if bytes.is_empty() => continue,
                    Ok(Some(Ok(bytes))) => {
                        if st.pos + bytes.len() as u64 > self.origin.version.size {
                            return Err(SourceError::Remote {
                                what: self.origin.what.clone(),
                                reason: format!(
                                    "sent more than the {} bytes it announced",
                                    self.origin.version.size
                                ),
                            });
                        }
                        st.pending = bytes;
                        return Ok(());
                    }
                    Ok(Some(Err(e))) => format!("transfer broke at byte {}: {e}", st.pos),
                    Ok(None) => format!("connection closed early, at byte {}", st.pos),
                    Err(_) => format!(
                        "timed out: no data for {} at byte {}",
                        super::remote::ms(idle),
                        st.pos
                    ),
                },
            };
            st.body = None;
            st.failures += 1;
            let n = st.failures;
            give_up_or_wait(&self.origin.settings, &self.origin.what, n, reason, None).await?;
        }
    }
}

/// A range of an object read from its [`Stream`].
pub struct StreamReader {
    stream: Arc<Stream>,
    id: u64,
    end: u64,
}

impl StreamReader {
    /// Fill `buf` with the bytes at `offset`, reading on from where the previous read ended.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        cancel: Cancel<'_>,
    ) -> Result<usize, SourceError> {
        if offset >= self.end || buf.is_empty() {
            return Ok(0);
        }
        self.stream.read(self.id, buf, offset, self.end, cancel)
    }

    pub fn end(&self) -> u64 {
        self.end
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        if let Ok(mut st) = self.stream.state.lock() {
            st.readers.remove(&self.id);
        }
        self.stream.moved.notify_all();
    }
}
