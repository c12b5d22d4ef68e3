//! `POST /v1/chat/completions`: validation, admission, time to first byte.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::completion;
use super::config::{Behaviour, RawReply};
use super::record::{Outcome, now_us};
use super::reply::{abort_frame, aborted, error_body, error_kind, finish_json, status_code};
use super::request::ChatRequest;
use super::script::Script;
use super::server::Inbound;
use super::sse;
use super::state::{Admission, RecordGuard, wait_evicted};

pub(crate) async fn completions(inbound: Inbound) -> Response {
    let Inbound { guard, body, .. } = inbound;
    let body = match body {
        Ok(body) => body,
        Err(message) => return bad_request(guard, &message),
    };
    guard.update(|record| {
        record.model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        record.stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    });
    let request = match ChatRequest::parse(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(guard, &message),
    };
    let shared = Arc::clone(guard.shared());
    let base = shared.behaviour_for(&request.model);
    let behaviour = match &request.overrides {
        None => base,
        Some(overrides) => match base.with_overrides(overrides) {
            Ok(behaviour) => behaviour,
            Err(err) => return bad_request(guard, &format!("invalid #sim directive: {err}")),
        },
    };
    let Some(admission) = shared.admit_chat(guard.seq(), &request.model, behaviour.load_ms) else {
        let message = format!("Model '{}' not found", request.model);
        let body = error_body(&message, "invalid_request_error", Some("model_not_found"));
        return finish_json(guard, StatusCode::NOT_FOUND, body);
    };
    // A failing request answers at once: it loads its model only if it got
    // the room on arrival, and never waits for the load.
    if let Some(code) = behaviour.fail_status {
        let status = status_code(code);
        let body = error_body(&behaviour.fail_message, error_kind(status), None);
        return finish_json(guard, status, body);
    }
    if let Some(raw) = behaviour.raw.clone() {
        // A replayed answer pays for its model's room and load like any other (a real host
        // loads before it says anything); only the bytes after that are the replay's.
        let ready_at_us = match admission.ready_at_us {
            Some(ready) => ready,
            None => {
                let shared = Arc::clone(guard.shared());
                shared
                    .acquire(guard.seq(), &request.model, behaviour.load_ms)
                    .await
            }
        };
        let load = ready_at_us.saturating_sub(now_us());
        tokio::time::sleep(Duration::from_micros(load) + Duration::from_millis(behaviour.ttft_ms))
            .await;
        return replay(guard, raw);
    }
    let script = Script::plan(&behaviour, &request, guard.seq(), now_us() / 1_000_000);
    answer(guard, &behaviour, &request, &script, admission).await
}

async fn answer(
    guard: RecordGuard,
    behaviour: &Behaviour,
    request: &ChatRequest,
    script: &Script,
    admission: Admission,
) -> Response {
    let Admission {
        mut evicted,
        ready_at_us,
    } = admission;
    let shared = Arc::clone(guard.shared());
    // The guard is owned by this future, so a client leaving now (hyper drops
    // the future) is recorded by the guard's Drop.
    let before_first_byte = async {
        let ready_at_us = match ready_at_us {
            Some(ready) => ready,
            None => {
                shared
                    .acquire(guard.seq(), &request.model, behaviour.load_ms)
                    .await
            }
        };
        // The load is part of the time to first token, as on a real host.
        let load = ready_at_us.saturating_sub(now_us());
        if load > 0 {
            tokio::time::sleep(Duration::from_micros(load)).await;
        }
        if behaviour.hang_before_first_byte {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(behaviour.ttft_ms)).await;
    };
    tokio::select! {
        () = before_first_byte => {}
        () = wait_evicted(&mut evicted) => return aborted(guard, Outcome::Evicted),
    }
    if request.stream {
        sse::respond(guard, script, evicted)
    } else {
        completion::respond(guard, script, evicted).await
    }
}

/// Sends a recorded answer byte for byte. The guard lives in the body, so a client leaving
/// early is recorded as such.
fn replay(guard: RecordGuard, raw: RawReply) -> Response {
    guard.first_byte();
    let status = status_code(raw.status);
    let interval = Duration::from_millis(raw.interval_ms);
    let pieces = raw.chunks.into_iter().enumerate();
    let abort = raw.abort;
    let body = futures::stream::unfold(
        (pieces, Some(guard)),
        move |(mut pieces, guard)| async move {
            let mut guard = guard?;
            match pieces.next() {
                Some((i, piece)) => {
                    if i > 0 && !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    Some((Ok(piece), (pieces, Some(guard))))
                }
                None if abort => {
                    guard.finish(Outcome::Dropped);
                    Some((abort_frame().await, (pieces, None)))
                }
                None => {
                    guard.finish(if status.is_success() {
                        Outcome::Completed
                    } else {
                        Outcome::FailedStatus(status.as_u16())
                    });
                    None
                }
            }
        },
    );
    (
        status,
        [(CONTENT_TYPE, raw.content_type)],
        Body::from_stream(body),
    )
        .into_response()
}

fn bad_request(guard: RecordGuard, message: &str) -> Response {
    let body = error_body(message, "invalid_request_error", None);
    finish_json(guard, StatusCode::BAD_REQUEST, body)
}
