//! The OpenAI-compatible front door: any OpenAI client — prompt-prix's adapter included —
//! points at the daemon as if it were one LM Studio server and gets correct dispatch.
//!
//! Requests are forwarded as the client wrote them (unknown fields kept) and the host's answer
//! is relayed byte for byte as it arrives; only the routing is ours.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::App;
use crate::error::{DispatchError, ErrorKind};
use crate::scheduler::TaskHandle;
use crate::task::{ANONYMOUS, TaskBody, TaskEvent, TaskSpec, check_priority};

/// `GET /v1/models`: a fresh (single-flight) read of every host, as `list_models` does, so a
/// client never sees a stale or not-yet-read list.
pub(super) async fn models(State(app): State<App>) -> Response {
    if let Err(e) = app.dispatcher.refresh_manifests().await {
        return error_response(&e);
    }
    let status = match app.dispatcher.status().await {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let mut ids: Vec<&String> = status
        .hosts
        .iter()
        .filter(|h| h.reachable)
        .flat_map(|h| &h.state.models)
        .collect();
    ids.sort();
    ids.dedup();
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "prix-dispatch"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(super) async fn chat_completions(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejected) => return body_refused(&rejected, app.dispatcher.max_request_bytes()),
    };
    let ChatRequest {
        model,
        stream,
        max_tokens,
        user,
        priority,
        has_priority,
    } = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    // `priority` is the daemon's; a host without priority scheduling refuses it (vLLM answers
    // 400 unless started with `--scheduling-policy priority`), so it is taken out. Only then
    // is the body written again.
    let body = if has_priority {
        match without_priority(&body) {
            Ok(b) => b,
            Err(e) => return error_response(&e),
        }
    } else {
        body
    };
    let spec = TaskSpec {
        model,
        // The host gets the client's own bytes: parsed once to check and route them, never
        // cloned or serialised again.
        body: TaskBody::Relay { body, max_tokens },
        // The client's Authorization header is for this daemon, never for a host.
        api_key: None,
        timeout: None,
        first_token_timeout: None,
        queue_timeout: None,
        client: None,
        client_id: client_id(user.as_deref(), &headers),
        priority: priority.unwrap_or(0),
    };
    let submitted = Instant::now();
    let mut handle = match app.dispatcher.submit(spec) {
        Ok(h) => h,
        Err(e) => return error_response(&e),
    };
    let mut host = String::new();
    let mut queue_wait_ms = 0.0;
    let content_type = loop {
        match handle.next().await {
            Some(TaskEvent::Started { host: h, .. }) => {
                host = h;
                queue_wait_ms = submitted.elapsed().as_secs_f64() * 1e3;
            }
            Some(TaskEvent::Answer { content_type }) => break content_type,
            Some(TaskEvent::Failed(e)) => return error_response(&e),
            Some(TaskEvent::Finished(_)) | None => {
                return error_response(&DispatchError::scheduler_stopped());
            }
            Some(_) => {}
        }
    };
    let mut response = if stream {
        // Headers go out now; every byte the host sends follows at once.
        Response::new(Body::from_stream(relay(handle)))
    } else {
        // One JSON document: wait for it whole, so a late failure still gets its status.
        let mut bytes = Vec::new();
        loop {
            match handle.next().await {
                Some(TaskEvent::Bytes(b)) => bytes.extend_from_slice(&b),
                Some(TaskEvent::Finished(_)) => break,
                Some(TaskEvent::Failed(e)) => return error_response(&e),
                None => return error_response(&DispatchError::scheduler_stopped()),
                Some(_) => {}
            }
        }
        Response::new(Body::from(bytes))
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&host) {
        headers.insert("x-prix-host", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{queue_wait_ms:.1}")) {
        headers.insert("x-prix-queue-wait-ms", v);
    }
    if stream {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    response
}

/// The host's bytes as they come; a failure after the first byte becomes an SSE error event.
/// The handle lives in the stream: a client that disconnects drops it, which cancels the task.
///
/// The host's bytes arrive in whole lines (the backend holds back a line cut short), and the
/// error event starts with a blank line, which ends any event the host left open without
/// adding one: so the event is always read on its own, and the `openai` SDK raises it
/// (`APIError` for a `data:` payload with an `error` key).
fn relay(
    handle: TaskHandle,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures::stream::unfold(Some(handle), |handle| async move {
        let mut handle = handle?;
        loop {
            match handle.next().await {
                Some(TaskEvent::Bytes(bytes)) => return Some((Ok(bytes), Some(handle))),
                Some(TaskEvent::Failed(e)) => {
                    let event = format!("\ndata: {}\n\n", error_json(&e));
                    return Some((Ok(Bytes::from(event)), None));
                }
                Some(TaskEvent::Finished(_)) | None => return None,
                Some(_) => {}
            }
        }
    })
}

/// What the daemon reads from a chat request; the rest is the host's business.
struct ChatRequest {
    model: String,
    stream: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    max_tokens: Option<u64>,
    /// OpenAI's end-user id, which names the client for fair share.
    user: Option<String>,
    /// Lower runs earlier (vLLM's convention).
    priority: Option<i32>,
    /// The body has a `priority` field, even `null`: it is taken out before relaying.
    has_priority: bool,
}

/// Who sent an OpenAI request, for fair share: its `user` field (OpenAI's end-user id), else
/// an `X-Prix-Client` header, else its bearer token (hashed: the id is shown on status pages),
/// else [`ANONYMOUS`].
pub fn client_id(user: Option<&str>, headers: &HeaderMap) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    if let Some(user) = user.filter(|u| !u.trim().is_empty()) {
        return format!("user:{user}");
    }
    if let Some(name) = headers
        .get("x-prix-client")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        return format!("header:{name}");
    }
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        let mut hasher = DefaultHasher::new();
        token.hash(&mut hasher);
        return format!("key:{:08x}", hasher.finish() as u32);
    }
    ANONYMOUS.to_string()
}

/// The request body without its `priority` field.
fn without_priority(body: &[u8]) -> Result<Bytes, DispatchError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| DispatchError::invalid(format!("the request body is not JSON: {e}")))?;
    if let Some(request) = value.as_object_mut() {
        request.remove("priority");
    }
    Ok(Bytes::from(value.to_string()))
}

/// A chat request: a JSON object with a model and messages.
fn parse(body: &[u8]) -> Result<ChatRequest, DispatchError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| DispatchError::invalid(format!("the request body is not JSON: {e}")))?;
    let Value::Object(request) = value else {
        return Err(DispatchError::invalid(
            "the request body must be a JSON object",
        ));
    };
    let model = match request.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        None | Some(Value::Null) => {
            return Err(DispatchError::invalid(
                "\"model\" is required: the id of a model a host lists (GET /v1/models)",
            ));
        }
        Some(other) => {
            return Err(DispatchError::invalid(format!(
                "\"model\" must be a non-empty string, the id of a model a host lists \
                 (GET /v1/models); got {other}"
            )));
        }
    };
    let Some(messages) = request
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    else {
        return Err(DispatchError::invalid(
            "\"messages\" must be a non-empty array, e.g. [{\"role\":\"user\",\"content\":\"hi\"}]",
        ));
    };
    for (i, message) in messages.iter().enumerate() {
        if !message.get("role").is_some_and(Value::is_string) {
            return Err(DispatchError::invalid(format!(
                "messages[{i}] must be an object with a string \"role\""
            )));
        }
    }
    let user = match request.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(other) => {
            return Err(DispatchError::invalid(format!(
                "\"user\" must be a string (an id for the end user), got {other}"
            )));
        }
    };
    let priority = match request.get("priority") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            crate::params::whole_number(v)
                .map_err(|_| {
                    DispatchError::invalid(format!(
                        "\"priority\" must be an integer (lower runs earlier), got {v}"
                    ))
                })
                .and_then(check_priority)?,
        ),
    };
    Ok(ChatRequest {
        model,
        user,
        priority,
        has_priority: request.contains_key("priority"),
        stream: request.get("stream") == Some(&Value::Bool(true)),
        // A whole-number float (`2.0`, as some clients send) is that integer: without it the
        // runaway-stream guard, which counts against it, would be off.
        max_tokens: request
            .get("max_completion_tokens")
            .or_else(|| request.get("max_tokens"))
            .and_then(|v| crate::params::whole_number(v).ok())
            .and_then(|n| u64::try_from(n).ok()),
    })
}

/// The HTTP status a failure maps to. A host's own 4xx (a prompt over the context size, a
/// bad parameter) passes through as that 4xx, whether the host sent it as its status or
/// inside a 200 stream: a client treats it as its own mistake and does not retry it.
fn status_for(error: &DispatchError) -> StatusCode {
    if matches!(error.kind, ErrorKind::HostError | ErrorKind::StreamError)
        && let Some(status) = error
            .host_status
            .filter(|s| (400..500).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
    {
        return status;
    }
    match error.kind {
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        // Known to no host at all: the client asked for something that does not exist.
        ErrorKind::ModelNotAvailable if !error.retryable => StatusCode::NOT_FOUND,
        // Known, but no healthy host serves it now.
        ErrorKind::ModelNotAvailable | ErrorKind::NoModelsAvailable | ErrorKind::ShuttingDown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::QueueTimeout | ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Authentication
        | ErrorKind::HostError
        | ErrorKind::Connection
        | ErrorKind::StreamAborted
        | ErrorKind::StreamTruncated
        | ErrorKind::StreamError
        | ErrorKind::Protocol => StatusCode::BAD_GATEWAY,
        ErrorKind::Cancelled | ErrorKind::SchedulerStopped => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

fn error_json(error: &DispatchError) -> Value {
    let status = status_for(error);
    json!({"error": {
        "message": error.message,
        "type": error_type(status),
        "code": error.kind,
        "retryable": error.retryable,
    }})
}

/// A failure in OpenAI's `{"error": {"message", "type", "code"}}` shape with a fitting status,
/// and `x-should-retry` saying whether the same request may succeed. The `openai` SDKs obey
/// that header before their status rules (openai-python `_should_retry`, openai-node
/// `shouldRetry`), so a permanent failure behind a 5xx status is not sent three times, and a
/// retryable one behind a 4xx is retried.
pub(super) fn error_response(error: &DispatchError) -> Response {
    let retry = HeaderValue::from_static(if error.retryable { "true" } else { "false" });
    (
        status_for(error),
        [("x-should-retry", retry)],
        axum::Json(error_json(error)),
    )
        .into_response()
}

/// A body the daemon would not read, in the OpenAI shape (axum answers in plain text, and the
/// `openai` SDKs then show only the status): over `[server] max_request_bytes` (413), or cut
/// off by the client. Not retryable as it is.
fn body_refused(rejected: &BytesRejection, limit: usize) -> Response {
    let status = rejected.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is larger than this daemon accepts ({limit} bytes, [server] \
             max_request_bytes): send a shorter request, or raise max_request_bytes in its \
             configuration"
        )
    } else {
        format!("could not read the request body: {}", rejected.body_text())
    };
    let mut response = error_body(status, "request_body", "invalid_request_error", &message);
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("false"));
    response
}

pub(super) fn error_body(status: StatusCode, code: &str, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code}});
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn a_model_that_is_not_a_string_is_named_as_such() {
        let error = |body: &str| parse(body.as_bytes()).err().unwrap().message;
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert!(error(&format!("{{{m}}}")).contains("\"model\" is required"));
        let wrong = error(&format!("{{\"model\":5,{m}}}"));
        assert!(
            wrong.contains("must be a non-empty string") && wrong.ends_with("got 5"),
            "{wrong}"
        );
        assert!(error(&format!("{{\"model\":\" \",{m}}}")).contains("non-empty string"));
    }

    #[test]
    fn max_tokens_as_a_whole_float_is_that_integer() {
        let at = |body: &str| parse(body.as_bytes()).unwrap().max_tokens;
        assert_eq!(
            at(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2.0}"#),
            Some(2)
        );
        assert_eq!(
            at(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#),
            Some(2)
        );
        assert_eq!(
            at(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":7.0,"max_tokens":2}"#
            ),
            Some(7)
        );
        assert_eq!(
            at(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2.5}"#),
            None
        );
    }
}
