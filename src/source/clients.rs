//! The network machinery of a rule — a tokio runtime, the HTTP client, the S3 client — built once
//! per rule and shared by all its jobs.
//!
//! Built lazily, on the first remote source a job of the rule meets (local-only rules pay nothing),
//! then kept in a process-wide table keyed by the rule's name; a job of a rule whose remote
//! settings (`allow.urls`, `s3`, `remote`) changed — a reload — builds a new one, and the old one
//! goes away with the last job still using it. The table lives here rather than in the daemon so
//! that `concatd once`, the daemon and `plan` share one path and none of them needs to know.
//! Per-job state (the versions a job pinned) stays with the job (`source::Remote`).

use std::sync::{Arc, Mutex};

use super::SourceError;
use super::http::HttpClient;
use super::s3::{S3Client, S3Setup};
use crate::config::{RemoteConfig, Rule, S3Config, UrlPolicy};

/// What a rule's clients are built from: a change of any of these rebuilds them.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    rule: String,
    urls: UrlPolicy,
    s3: Option<S3Config>,
    remote: RemoteConfig,
}

impl Key {
    fn of(rule: &Rule) -> Self {
        Self {
            rule: rule.name.clone(),
            urls: rule.allow.urls.clone(),
            s3: rule.s3.clone(),
            remote: rule.remote.clone(),
        }
    }
}

static TABLE: Mutex<Vec<(Key, Arc<Clients>)>> = Mutex::new(Vec::new());

/// Why a rule's clients could not be built: concatd's own trouble (kind `internal`).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot start the network runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// A rule's runtime and clients.
pub struct Clients {
    /// Owned so it can be shut down without blocking when the last job lets go (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
    pub policy: Arc<UrlPolicy>,
    pub http: Arc<HttpClient>,
    s3_config: Option<S3Config>,
    /// Kept once built; a failure (missing credentials) is not kept, so the next job tries again.
    s3: Mutex<Option<Arc<S3Client>>>,
    pub settings: RemoteConfig,
}

impl Clients {
    /// The clients of `rule`, built now if it has none or its remote settings changed.
    pub fn for_rule(rule: &Rule) -> Result<Arc<Self>, SetupError> {
        let key = Key::of(rule);
        let mut table = TABLE.lock().expect("clients table");
        if let Some((_, clients)) = table.iter().find(|(k, _)| *k == key) {
            return Ok(clients.clone());
        }
        let clients = Arc::new(Self::new(&key)?);
        tracing::info!(rule = %rule.name, "remote client created");
        table.retain(|(k, _)| k.rule != key.rule);
        table.push((key, clients.clone()));
        Ok(clients)
    }

    fn new(key: &Key) -> Result<Self, SetupError> {
        let policy = Arc::new(key.urls.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("concatd-remote")
            .enable_all()
            .build()
            .map_err(SetupError::Runtime)?;
        // reqwest's client must be built inside the runtime that drives it.
        let http = {
            let _guard = rt.enter();
            HttpClient::new(policy.clone(), &key.remote)
                .map_err(|e| SetupError::Http(e.to_string()))?
        };
        Ok(Self {
            rt: Some(rt),
            policy,
            http: Arc::new(http),
            s3_config: key.s3.clone(),
            s3: Mutex::new(None),
            settings: key.remote.clone(),
        })
    }

    pub fn rt(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("runtime lives as long as its clients")
            .handle()
    }

    /// The S3 client, built on first use (loading the AWS chain and resolving credentials).
    pub fn s3(&self, what: &str) -> Result<Arc<S3Client>, SourceError> {
        let mut s3 = self.s3.lock().expect("s3 client lock");
        if let Some(client) = &*s3 {
            return Ok(client.clone());
        }
        let built = self
            .rt()
            .block_on(S3Client::new(self.s3_config.as_ref(), &self.settings))
            .map_err(|source: S3Setup| SourceError::S3Setup {
                what: what.to_owned(),
                source,
            })?;
        let client = Arc::new(built);
        *s3 = Some(client.clone());
        Ok(client)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        // A plain drop would wait for the runtime's tasks, and panics inside async contexts.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
