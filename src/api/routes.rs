//! The routes, authorization, and the read-only endpoints (`/healthz`, `/metrics`, rules, logs).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::auth::{self, Access};
use super::{Peer, State, jobs};
use crate::config::Rule;

pub(super) fn router(state: Arc<State>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/rules", get(rules))
        .route("/v1/rules/{rule}/jobs", post(jobs::post_job))
        .route("/v1/rules/{rule}/logs", get(logs))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .fallback(|| async { Refusal::new(StatusCode::NOT_FOUND, "no such endpoint") })
        // A known path asked with another method: the same JSON refusal as every other.
        .method_not_allowed_fallback(|| async {
            Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(state)
}

/// A refused request: its status and a message for the caller (never the token).
#[derive(Debug)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"status": self.status.as_u16(), "message": self.message}
        });
        let mut r = (self.status, axum::Json(body)).into_response();
        // A body left unread (too large, too slow): close rather than read the rest of it.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT | StatusCode::BAD_REQUEST
        ) {
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// What the caller may touch: socket peers by uid, TCP callers by their bearer token.
pub(super) fn authorize(
    state: &State,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Access, Refusal> {
    match peer {
        Peer::Unix { allowed: true, .. } => Ok(Access::All),
        Peer::Unix { uid, .. } => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            match uid {
                Some(u) => format!("uid {u} is not in api.socket_uids"),
                None => "the peer's credentials are unknown".to_owned(),
            },
        )),
        Peer::Tcp(_) => {
            let mut values = headers.get_all(header::AUTHORIZATION).iter();
            let (first, second) = (values.next(), values.next());
            // Two credentials in one request: a gateway in front may have judged the other one,
            // so neither is taken.
            if second.is_some() {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "more than one Authorization header",
                ));
            }
            let token = first
                .and_then(|v| auth::bearer(v.as_bytes()))
                .ok_or_else(|| {
                    Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        "an 'Authorization: Bearer TOKEN' header is needed",
                    )
                })?;
            state
                .tokens
                .lookup(token)
                .ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, "unknown token"))
        }
    }
}

/// A query string that does not parse (`?n=-1`, a key twice): `400` in the API's error shape,
/// not axum's plain-text rejection.
pub(super) fn bad_query(e: QueryRejection) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, e.body_text())
}

/// The rule `name` if it exists (`404`) and `access` names it (`403`).
pub(super) fn rule_for(state: &State, access: &Access, name: &str) -> Result<Rule, Refusal> {
    let rules = state.rules();
    let rule = rules
        .rule(name)
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, format!("no rule '{name}'")))?;
    if !access.allows(name) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("this token may not use rule '{name}'"),
        ));
    }
    Ok(rule.clone())
}

async fn healthz(AxState(state): AxState<Arc<State>>) -> Response {
    if super::is_ready(&state) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: not every watch is armed yet\n",
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
}

async fn rules(
    AxState(state): AxState<Arc<State>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let access = authorize(&state, &peer, &headers)?;
    let rules = state.rules();
    let status = tokio::task::spawn_blocking(move || {
        crate::inbox::status(rules.rules.iter().filter(|r| access.allows(&r.name)))
    })
    .await
    .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(axum::Json(status).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    n: Option<usize>,
}

/// The most lines one call returns.
const MAX_LOG_LINES: usize = 100_000;

async fn logs(
    AxState(state): AxState<Arc<State>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let access = authorize(&state, &peer, &headers)?;
    let rule = rule_for(&state, &access, &name)?;
    let Query(q) = q.map_err(bad_query)?;
    let n = q.n.unwrap_or(10).min(MAX_LOG_LINES);
    let path = crate::logging::rule_log_path(&state.rules().log_dir, &rule.name);
    let text = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match std::fs::File::open(&path) {
            Ok(mut f) => crate::logging::print_tail(&mut f, n, &mut out)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    })
    .await
    .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the log: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn state(ready: bool, dir: &std::path::Path) -> Arc<State> {
        for d in ["in", "out"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        let text = "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: out\n";
        let rules = crate::config::parse(text, &dir.join("rules.yaml"), dir).unwrap();
        Arc::new(State {
            rules: Arc::new(std::sync::RwLock::new(Arc::new(rules))),
            config: crate::config::ApiConfig::default(),
            tokens: auth::Tokens::new(None),
            ready: Arc::new(AtomicBool::new(ready)),
            stop: tokio_util::sync::CancellationToken::new(),
            results: Default::default(),
        })
    }

    #[tokio::test]
    async fn healthz_is_503_until_ready() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(false, dir.path());
        assert_eq!(
            healthz(AxState(st.clone())).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        st.ready.store(true, Ordering::Relaxed);
        assert_eq!(healthz(AxState(st)).await.status(), StatusCode::OK);
    }
}
