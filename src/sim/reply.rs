//! Response helpers shared by the handlers.

use std::io;

use axum::Json;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::stream;
use serde_json::{Value, json};

use super::record::Outcome;
use super::state::RecordGuard;

/// Answers `body` with `status` and finishes the record accordingly.
pub(crate) fn finish_json(mut guard: RecordGuard, status: StatusCode, body: Value) -> Response {
    guard.first_byte();
    guard.finish(outcome_for(status));
    (status, Json(body)).into_response()
}

fn outcome_for(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Completed
    } else {
        Outcome::FailedStatus(status.as_u16())
    }
}

/// An OpenAI-shaped error body.
pub(crate) fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "code": code}})
}

/// The error `type` OpenAI uses for a status class.
pub(crate) fn error_kind(status: StatusCode) -> &'static str {
    if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    }
}

/// A configured status, or 500 if the number is not a valid status code.
pub(crate) fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A 200 whose body breaks off at once, so the client sees the connection
/// fail rather than an answer.
pub(crate) fn aborted(mut guard: RecordGuard, outcome: Outcome) -> Response {
    guard.first_byte();
    guard.finish(outcome);
    Body::from_stream(stream::once(abort_frame())).into_response()
}

/// The error that makes hyper abort a chunked body. Yielding first lets hyper
/// flush what was already produced, so the client gets the partial answer
/// before the connection breaks (as with a real crash mid-generation).
pub(crate) async fn abort_frame() -> Result<String, io::Error> {
    tokio::task::yield_now().await;
    Err(io::Error::other("simulated abrupt end of response"))
}
