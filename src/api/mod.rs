//! The HTTP API (`api:` in the rules file): a Unix socket for local callers (peers checked with
//! `SO_PEERCRED`) and TCP for callers behind a gateway (bearer tokens), served inside the
//! daemon's runtime.
//!
//! The API never runs a job: it drops the manifest into the rule's folder through
//! [`crate::inbox::drop_manifest`], exactly as `submit` does, and waits for its result like
//! `submit --wait`. Queueing, claims, exactly-once results and crash recovery therefore all come
//! from the folder path; a caller that hangs up only stops waiting.
//!
//! Connections are accepted by our own loop (not `axum::serve`) so that each one can carry its
//! peer's credentials, be counted against `max_connections` and get hyper's header read timeout.
//! On stop, listeners close, waiting calls answer `202` with their job id at once, and open
//! connections get a short graceful close before they are dropped, so SIGTERM ends the daemon
//! promptly whatever clients do.

mod auth;
pub mod client;
mod jobs;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{Access, new_token, token_hash_hex};

use crate::config::{ApiConfig, Rules};
use crate::inbox::ResultWatch;

/// The rules the daemon runs now (replaced on reload).
pub type SharedRules = Arc<RwLock<Arc<Rules>>>;

/// How long open connections get to finish after a stop before they are dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api.socket {}: {message}", path.display())]
    Socket { path: PathBuf, message: String },
    #[error("api.listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    /// A socket peer; `allowed` when its uid is the daemon's own or in `socket_uids`.
    Unix {
        uid: Option<u32>,
        allowed: bool,
    },
    Tcp(SocketAddr),
}

/// What every request handler shares.
pub(crate) struct State {
    pub rules: SharedRules,
    pub config: ApiConfig,
    pub tokens: auth::Tokens,
    /// Every watch armed (where the daemon tells systemd `READY=1`).
    pub ready: Arc<AtomicBool>,
    /// Stopping: waiting calls answer at once.
    pub stop: CancellationToken,
    results: Mutex<HashMap<PathBuf, Arc<ResultWatch>>>,
}

impl State {
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().expect("rules lock").clone()
    }

    /// The one result watch of a watch folder, shared by every call waiting there.
    pub fn result_watch(&self, watch: &Path) -> Arc<ResultWatch> {
        let mut map = self.results.lock().expect("results lock");
        map.entry(watch.to_owned())
            .or_insert_with(|| Arc::new(ResultWatch::start(watch)))
            .clone()
    }
}

/// The running API.
pub struct Api {
    stop: CancellationToken,
    tasks: TaskTracker,
    /// The socket file we bound, with its inode: removed on stop if it is still ours.
    socket: Option<(PathBuf, u64)>,
    /// The TCP address bound (the port chosen when `listen` asked for port 0).
    pub local_addr: Option<SocketAddr>,
}

/// Bind the API's socket and port and start serving. Call it once every watch is armed; the
/// health check answers `503` until `ready` is set.
pub async fn start(
    config: &ApiConfig,
    rules: SharedRules,
    ready: Arc<AtomicBool>,
) -> Result<Api, ApiError> {
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state = Arc::new(State {
        rules,
        config: config.clone(),
        tokens: auth::Tokens::new(config.tokens_file.clone()),
        ready,
        stop: stop.clone(),
        results: Mutex::new(HashMap::new()),
    });
    let router = routes::router(state.clone());
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut socket = None;
    if let Some(path) = &config.socket {
        let listener = bind_socket(path).await?;
        let ino = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .unwrap_or(0);
        socket = Some((path.clone(), ino));
        tracing::info!(socket = %path.display(), "api listening");
        let own = rustix::process::getuid().as_raw();
        let uids: Arc<[u32]> = config.socket_uids.clone().into();
        let listener = Arc::new(listener);
        Conn::new(&router, &state, &slots, &tasks).accept_loop(move || {
            let listener = listener.clone();
            let uids = uids.clone();
            async move {
                let (stream, _) = listener.accept().await?;
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                let allowed = uid.is_some_and(|u| u == own || uids.contains(&u));
                Ok((stream, Peer::Unix { uid, allowed }))
            }
        });
    }
    let mut local_addr = None;
    if let Some(addr) = config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        local_addr = Some(bound);
        tracing::info!(address = %bound, "api listening");
        let listener = Arc::new(listener);
        Conn::new(&router, &state, &slots, &tasks).accept_loop(move || {
            let listener = listener.clone();
            async move {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((stream, Peer::Tcp(peer)))
            }
        });
    }
    tasks.close();
    Ok(Api {
        stop,
        tasks,
        socket,
        local_addr,
    })
}

/// Out of file descriptors or a connection reset before it was accepted: log, breathe, go on.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "api: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

impl Api {
    /// Stop serving: listeners closed, waiting calls answered, connections given
    /// [`CLOSE_GRACE`], the socket file removed.
    pub async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(CLOSE_GRACE * 2, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("api: connections still open after the grace period: dropped");
        }
        if let Some((path, ino)) = &self.socket
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *ino)
        {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("api stopped");
    }
}

/// Bind the Unix socket at `path`: a stale socket file (nobody accepting on it) is replaced;
/// a live one, or any other kind of file, is refused. Mode 0660: who may connect is then up to
/// the socket's group and folder, and every peer's uid is checked anyway (so the moment between
/// bind and chmod lets nobody in who would not be checked).
async fn bind_socket(path: &Path) -> Result<UnixListener, ApiError> {
    let fail = |message: String| ApiError::Socket {
        path: path.to_owned(),
        message,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(fail("another process is accepting on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(fail("exists and is not a socket".into())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| fail(format!("cannot set mode 0660: {e}")))?;
    Ok(listener)
}

/// What an accept loop needs to serve a connection.
#[derive(Clone)]
struct Conn {
    router: axum::Router,
    state: Arc<State>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Conn {
    fn new(
        router: &axum::Router,
        state: &Arc<State>,
        slots: &Arc<Semaphore>,
        tasks: &TaskTracker,
    ) -> Self {
        Self {
            router: router.clone(),
            state: state.clone(),
            slots: slots.clone(),
            tasks: tasks.clone(),
            stop: state.stop.clone(),
        }
    }

    /// A connection slot for a connection just accepted; `None` when stopping. Taken after the
    /// accept, not before: each listener holding a slot while it waits in `accept` would starve
    /// the other one when `max_connections` is small. Past `max_connections`, each listener
    /// holds one accepted connection until a slot frees, and the rest wait in the backlog.
    async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            _ = self.stop.cancelled() => None,
        }
    }

    /// Accept connections with `accept` until stopping, each served once it has a slot.
    fn accept_loop<S, F, Fut>(self, mut accept: F)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = std::io::Result<(S, Peer)>> + Send,
    {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = accept() => r,
                    _ = self.stop.cancelled() => break,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let Some(permit) = self.slot().await else {
                            break;
                        };
                        self.serve(stream, peer, permit);
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }

    fn serve<S>(&self, stream: S, peer: Peer, permit: tokio::sync::OwnedSemaphorePermit)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let stop = self.stop.clone();
        let header_timeout = self.state.config.header_timeout;
        self.tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    let mut router = router.clone();
                    async move {
                        tower::Service::call(&mut router, req.map(axum::body::Body::new)).await
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            }
        });
    }
}

/// Whether the daemon is ready (for `/healthz`).
pub(crate) fn is_ready(state: &State) -> bool {
    state.ready.load(Ordering::Relaxed)
}
