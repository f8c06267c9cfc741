//! `POST /v1/rules/{rule}/jobs` and `GET /v1/jobs/{id}`.
//!
//! A posted manifest is dropped as `api-<job id>.json` (or `.yaml`) into the rule's folder, the
//! very drop `submit` makes; the claim gives the job the id its name carries (see
//! [`crate::inbox::proposed_id`]), so the id answered here is the one in the result.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::routes::{Refusal, authorize, bad_query, rule_for};
use super::{Peer, State};
use crate::inbox::{Dropped, JobState, Waited};
use crate::result::{ErrorKind, JobResult, Status};

#[derive(Deserialize)]
pub(super) struct PostQuery {
    wait: Option<String>,
}

/// How long a call asks to wait: `None` async; `true` up to `wait_max`; a duration, capped at
/// `wait_max`.
fn wait_for(q: &PostQuery, wait_max: Duration) -> Result<Option<Duration>, Refusal> {
    match q.wait.as_deref().map(str::trim) {
        None | Some("false") | Some("0") | Some("") => Ok(None),
        Some("true") => Ok(Some(wait_max)),
        Some(text) => crate::config::parse_duration(text)
            .map(|d| Some(d.min(wait_max)))
            .map_err(|m| Refusal::new(StatusCode::BAD_REQUEST, format!("wait: {m}"))),
    }
}

/// The status of a sync call's answer, as SPEC fixes it.
pub(super) fn status_of(result: &JobResult) -> StatusCode {
    if result.status == Status::Succeeded {
        return StatusCode::OK;
    }
    let Some(e) = &result.error else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    match e.kind {
        ErrorKind::OutputExists => StatusCode::CONFLICT,
        ErrorKind::InvalidManifest
        | ErrorKind::SizeMismatch
        | ErrorKind::ChecksumMismatch
        | ErrorKind::TooLarge
        | ErrorKind::OutputNotAllowed
        | ErrorKind::SourceNotAllowed
        | ErrorKind::SourceNotFound
        | ErrorKind::SourceNotRegular
        | ErrorKind::SourceReadFailed
        | ErrorKind::SourceChanged
        | ErrorKind::SourceArchived => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::RemoteFailed => StatusCode::BAD_GATEWAY,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Whether a `Content-Type` says YAML (then the manifest is dropped as `.yaml`).
fn is_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|t| {
            matches!(
                t.as_str(),
                "application/yaml" | "application/x-yaml" | "text/yaml"
            )
        })
}

/// `202`: the job is queued; where to ask for it.
fn accepted(id: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        axum::Json(json!({"job_id": id, "state": "waiting"})),
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(super) async fn post_job(
    AxState(state): AxState<Arc<State>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    q: Result<Query<PostQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let access = authorize(&state, &peer, &headers)?;
    let rule = rule_for(&state, &access, &name)?;
    let Query(q) = q.map_err(bad_query)?;
    let wait = wait_for(&q, state.config.wait_max)?;
    // A body larger than a manifest may be could only be dropped to fail: refused here instead.
    let max = state
        .config
        .max_body
        .min(crate::manifest::MAX_MANIFEST_BYTES);
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the manifest is larger than api.max_body ({max} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let bytes =
        match tokio::time::timeout(state.config.body_timeout, axum::body::to_bytes(body, limit))
            .await
        {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body did not arrive within api.body_timeout",
                ));
            }
            Ok(Err(e)) => {
                let length_limit = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                return Err(if length_limit {
                    too_large()
                } else {
                    Refusal::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
                });
            }
            Ok(Ok(b)) => b,
        };
    let id = crate::job::new_job_id();
    let file = crate::inbox::api_name(&id, is_yaml(&headers));
    let watch = rule.watch.clone();
    let drop_name = file.clone();
    let ino = tokio::task::spawn_blocking(move || {
        crate::inbox::drop_manifest(&watch, &drop_name, &bytes)
    })
    .await
    .map_err(internal)?
    .map_err(|e| {
        tracing::warn!(rule = %rule.name, error = %e, "api: cannot drop a manifest");
        if e.io_kind() == std::io::ErrorKind::StorageFull {
            Refusal::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        } else {
            internal(e)
        }
    })?;
    {
        let span = tracing::info_span!("rule", rule = %rule.name);
        let _enter = span.enter();
        tracing::info!(job_id = %id, manifest = %file.to_string_lossy(), peer = ?peer_label(&peer), "api: manifest dropped");
    }
    let Some(wait) = wait else {
        return Ok(accepted(&id));
    };
    let dropped = Dropped {
        watch: rule.watch.clone(),
        name: file,
        ino,
    };
    let events = state.result_watch(&rule.watch);
    let until = tokio::time::Instant::now() + wait;
    let waited = tokio::select! {
        w = crate::inbox::wait_result(&dropped, &events, Some(until), true) => w,
        _ = state.stop.cancelled() => Waited::TimedOut,
    };
    Ok(match waited {
        Waited::Filed(result) => (status_of(&result), axum::Json(*result)).into_response(),
        // Past the wait, stopping, or no daemon watching the folder now (its rule was removed by
        // a reload): the job stays queued; the caller asks again by its id.
        Waited::TimedOut | Waited::NoDaemon => accepted(&id),
    })
}

/// The peer as logged: an address or a uid, never a credential.
fn peer_label(peer: &Peer) -> String {
    match peer {
        Peer::Unix { uid, .. } => format!("uid {}", uid.map_or("?".into(), |u| u.to_string())),
        Peer::Tcp(addr) => addr.to_string(),
    }
}

pub(super) async fn get_job(
    AxState(state): AxState<Arc<State>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let access = authorize(&state, &peer, &headers)?;
    let unknown = || Refusal::new(StatusCode::NOT_FOUND, format!("no job '{id}'"));
    if !crate::inbox::is_job_id(&id) {
        return Err(unknown());
    }
    let rules = state.rules();
    let lookup_id = id.clone();
    // Only the rules the caller may use are searched: another rule's job is as unknown as none.
    let found = tokio::task::spawn_blocking(move || {
        rules
            .rules
            .iter()
            .filter(|r| access.allows(&r.name))
            .find_map(|r| {
                crate::inbox::job_state(&r.watch, &lookup_id).map(|s| (r.name.clone(), s))
            })
    })
    .await
    .map_err(internal)?;
    let Some((rule, job)) = found else {
        return Err(unknown());
    };
    let body = match job {
        JobState::Waiting => json!({"job_id": id, "rule": rule, "state": "waiting"}),
        JobState::Running => json!({"job_id": id, "rule": rule, "state": "running"}),
        JobState::Finished(result) => {
            let state = if result.status == Status::Succeeded {
                "succeeded"
            } else {
                "failed"
            };
            json!({"job_id": id, "rule": rule, "state": state, "result": result})
        }
    };
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: &str) -> JobResult {
        serde_json::from_str(&format!(
            r#"{{"status":"failed","rule":"r","manifest":"m","job_id":"j","started_at":"","finished_at":"","duration_ms":0,"error":{{"kind":"{kind}","message":"x"}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn status_codes_follow_the_spec() {
        for (kind, code) in [
            ("output_exists", 409),
            ("invalid_manifest", 422),
            ("size_mismatch", 422),
            ("checksum_mismatch", 422),
            ("too_large", 422),
            ("output_not_allowed", 422),
            ("source_not_allowed", 422),
            ("source_not_found", 422),
            ("source_not_regular", 422),
            ("source_read_failed", 422),
            ("source_changed", 422),
            ("source_archived", 422),
            ("remote_failed", 502),
            ("no_space", 507),
            ("cancelled", 503),
            ("internal", 500),
        ] {
            assert_eq!(status_of(&failed(kind)).as_u16(), code, "{kind}");
        }
    }

    #[test]
    fn wait_values() {
        let max = Duration::from_secs(60);
        let q = |w: Option<&str>| PostQuery {
            wait: w.map(str::to_owned),
        };
        assert_eq!(wait_for(&q(None), max).unwrap(), None);
        assert_eq!(wait_for(&q(Some("false")), max).unwrap(), None);
        assert_eq!(wait_for(&q(Some("true")), max).unwrap(), Some(max));
        assert_eq!(
            wait_for(&q(Some("5s")), max).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(wait_for(&q(Some("2h")), max).unwrap(), Some(max));
        assert!(wait_for(&q(Some("soon")), max).is_err());
    }
}
