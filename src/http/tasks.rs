//! MCP tasks in the 2025-11-25 experimental form on Streamable HTTP (`/mcp`): an axum
//! middleware in front of rmcp's `StreamableHttpService` that does over HTTP what
//! [`crate::mcp_tasks_wire::serve_stream`] does over stdio.
//!
//! rmcp 3.11 answers every `/mcp` POST itself, and it knows only the SEP-2663 task form: its
//! `initialize` answer has no `capabilities.tasks`, its `tools/list` no `execution`, and it
//! drops `params.task` from `tools/call` (see `mcp_tasks_wire`). So for every POST this layer
//! reads the body (bounded by `[server] max_request_bytes`, as rmcp itself bounds it) and runs
//! [`route`] on it:
//!
//! * taken requests (`tools/call` with `params.task`, `tasks/get`, `tasks/result`,
//!   `tasks/list`, `tasks/cancel`) are answered here with one `application/json` JSON-RPC
//!   message, the answer the spec allows for any POSTed request (2025-11-25 transports,
//!   "Sending Messages to the Server", item 5). Their owner is the session named by
//!   `Mcp-Session-Id`, so one session cannot see or cancel another's tasks: they are "no task
//!   …" to it;
//! * passed requests go on to rmcp byte for byte; the answers to `initialize` and
//!   `tools/list` get this form's declarations ([`patch_response`]), in an `application/json`
//!   body or in the SSE stream rmcp answers with ([`SsePatch`] rewrites only the event holding
//!   that answer and streams everything else on unchanged).
//!
//! Only requests on a session take this path. A POST without `Mcp-Session-Id` is an
//! `initialize` (which creates one: its answer is patched, and the session's task wire is
//! registered with [`Sessions`]) or a stateless request of the 2026-07-28 protocol, whose
//! tasks are the SEP-2663 extension that rmcp serves; those pass untouched. A session id
//! rmcp no longer knows passes too, and rmcp answers 404 so the client starts over. Because
//! a task is only ever taken on a session rmcp created, rmcp's `Host` check (DNS rebinding)
//! guards this path as well: no session id can be obtained past it.

use std::cell::RefCell;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rmcp::transport::streamable_http_server::session::SessionId;
use serde_json::Value;

use super::sessions::Sessions;
use crate::mcp::PrixServer;
use crate::mcp_tasks_wire::{
    Patch, Route, TaskWire, initialize_declares_extension, patch_response, route,
};

/// The session header (2025-11-25 transports, "Session Management").
pub const SESSION_HEADER: &str = "mcp-session-id";

/// Most bytes of an `application/json` `initialize` / `tools/list` answer read to patch it,
/// 16 MiB: both are a few kilobytes (four tools with their schemas); a larger body is not one
/// of them and passes unpatched.
const PATCH_LIMIT: usize = 16 << 20;

/// One session's 2025-11-25 task state, kept with the session in [`Sessions`] and dropped
/// (its working tasks cancelled, see [`TaskWire::end`]) when the session ends.
#[derive(Clone)]
pub struct SessionTasks {
    /// Runs the session's task requests, as the session's own client.
    pub wire: TaskWire,
    /// The client declared the SEP-2663 extension at `initialize`: its `tasks/get` and
    /// `tasks/cancel` are rmcp's.
    pub sep2663: bool,
}

impl std::fmt::Debug for SessionTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTasks")
            .field("sep2663", &self.sep2663)
            .finish_non_exhaustive()
    }
}

tokio::task_local! {
    /// The server rmcp's service factory built while this task served an `initialize`
    /// (rmcp 3.11 calls the factory inside the request's own future, tower.rs:2312, just
    /// before it creates the session): how the layer learns the session's client.
    static BUILT: RefCell<Option<PrixServer>>;
}

/// Wraps rmcp's service factory: records the server it builds for the `initialize` being
/// served, if the layer is listening (it is only for `initialize` without a session).
pub fn built(server: PrixServer) -> PrixServer {
    let _ = BUILT.try_with(|slot| *slot.borrow_mut() = Some(server.clone()));
    server
}

/// What the middleware needs: the sessions (to find a session's tasks and register new
/// ones) and the request size limit.
#[derive(Clone)]
pub struct TaskLayer {
    pub sessions: Arc<Sessions>,
    /// `[server] max_request_bytes`.
    pub max_request_bytes: usize,
}

/// Why a POST body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("Payload Too Large: request body exceeds {0} bytes, or was cut off")]
    TooLarge(usize),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        (StatusCode::PAYLOAD_TOO_LARGE, self.to_string()).into_response()
    }
}

/// The middleware (see the module docs).
pub async fn layer(State(layer): State<TaskLayer>, request: Request, next: Next) -> Response {
    if request.method() == Method::DELETE {
        return session_ended(next.run(request).await);
    }
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, layer.max_request_bytes).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(error = %e, "MCP POST body not read");
            return BodyError::TooLarge(layer.max_request_bytes).into_response();
        }
    };
    let message: Option<Value> = serde_json::from_slice(&bytes).ok();
    let session = parts
        .headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(SessionId::from);
    let request = Request::from_parts(parts, Body::from(bytes));
    // Not JSON: rmcp says what is wrong with it.
    let Some(message) = message else {
        return next.run(request).await;
    };
    let Some(session) = session else {
        if message.get("method").and_then(Value::as_str) == Some("initialize") {
            return initialize(&layer, message, request, next).await;
        }
        return next.run(request).await;
    };
    let Some(tasks) = layer.sessions.tasks(&session) else {
        return next.run(request).await;
    };
    match route(&message, tasks.sep2663) {
        Route::Pass(None) => next.run(request).await,
        Route::Pass(Some(patch)) => {
            let id = message.get("id").cloned().unwrap_or(Value::Null);
            patched(next.run(request).await, patch, id).await
        }
        Route::Answer(answer) => {
            layer.sessions.used(&session);
            json_response(&answer)
        }
        Route::Take { id, call } => {
            let _in_flight = layer.sessions.in_flight(&session);
            tracing::debug!(session = %session, method = ?message.get("method"), "MCP task request taken");
            json_response(&tasks.wire.answer(&id, call).await)
        }
    }
}

/// rmcp answers a session's `DELETE` with 202 Accepted; the Python `mcp` SDK takes only 200
/// or 204 as success and logs "Session termination failed: 202" on every close
/// (`mcp/client/streamable_http.py`, `terminate_session`). The session is closed by then, so
/// say 200; the TypeScript SDK takes any 2xx.
fn session_ended(mut response: Response) -> Response {
    if response.status() == StatusCode::ACCEPTED {
        *response.status_mut() = StatusCode::OK;
    }
    response
}

/// Passes an `initialize` to rmcp, registers the session it creates with the server rmcp
/// built for it, and patches the answer.
async fn initialize(layer: &TaskLayer, message: Value, request: Request, next: Next) -> Response {
    let sep2663 = initialize_declares_extension(&message);
    let (response, server) = BUILT
        .scope(RefCell::new(None), async move {
            let response = next.run(request).await;
            (response, BUILT.with(|slot| slot.borrow_mut().take()))
        })
        .await;
    let session = response
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(SessionId::from);
    if let (Some(session), Some(server)) = (session, server) {
        let wire = TaskWire::new(server.owning_tasks());
        layer
            .sessions
            .attach_tasks(&session, SessionTasks { wire, sep2663 });
    }
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    patched(response, Patch::Initialize, id).await
}

fn json_response(message: &Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        message.to_string(),
    )
        .into_response()
}

/// rmcp's `response` with `patch` applied to the answer with `id`: a JSON body is read whole
/// (it is short), an SSE body streams through [`SsePatch`]; anything else is left alone.
async fn patched(response: Response, patch: Patch, id: Value) -> Response {
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (mut parts, body) = response.into_parts();
    if content_type.starts_with("application/json") {
        let Ok(bytes) = axum::body::to_bytes(body, PATCH_LIMIT).await else {
            return (StatusCode::BAD_GATEWAY, "MCP answer could not be read").into_response();
        };
        let Ok(mut message) = serde_json::from_slice::<Value>(&bytes) else {
            return Response::from_parts(parts, Body::from(bytes));
        };
        if message.get("id") != Some(&id) {
            return Response::from_parts(parts, Body::from(bytes));
        }
        patch_response(patch, &mut message);
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(message.to_string()));
    }
    if !content_type.starts_with("text/event-stream") {
        return Response::from_parts(parts, body);
    }
    let state = Some((body.into_data_stream(), SsePatch::new(patch, id)));
    let stream = futures::stream::unfold(state, |state| async move {
        let (mut data, mut sse) = state?;
        loop {
            match data.next().await {
                Some(Ok(chunk)) => {
                    let out = sse.feed(&chunk);
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), Some((data, sse))));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    let rest = sse.finish();
                    return (!rest.is_empty()).then(|| (Ok(Bytes::from(rest)), None));
                }
            }
        }
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Rewrites, in an SSE byte stream (WHATWG HTML, "Server-sent events", 9.2.5: events end at
/// a blank line; `data:` lines, one optional space after the colon, joined by newlines), the
/// one event whose data is the JSON-RPC answer with `id`, applying `patch`. Every other event
/// comes out byte-identical, and once the answer is patched the rest passes without being
/// looked at. Only the event being read is held back, never the stream.
#[derive(Debug)]
pub struct SsePatch {
    patch: Patch,
    id: Value,
    /// Bytes of the event not yet complete.
    pending: Vec<u8>,
    done: bool,
}

impl SsePatch {
    pub fn new(patch: Patch, id: Value) -> Self {
        Self {
            patch,
            id,
            pending: Vec::new(),
            done: false,
        }
    }

    /// The bytes to send on after `chunk` arrived (possibly none yet).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.done {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            match self.rewrite(&event) {
                Some(rewritten) => {
                    out.extend(rewritten);
                    out.append(&mut self.pending);
                    self.done = true;
                    return out;
                }
                None => out.extend(event),
            }
        }
        out
    }

    /// What is left when the stream ends (an unfinished event, sent as it came).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// `event` (ending with its blank line) rewritten, if it holds the answer to patch.
    fn rewrite(&self, event: &[u8]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(event).ok()?;
        let lines: Vec<&str> = text
            .split('\n')
            .map(|line| line.strip_suffix('\r').unwrap_or(line))
            .collect();
        let data: Vec<&str> = lines.iter().filter_map(|line| data_of(line)).collect();
        if data.is_empty() {
            return None;
        }
        let mut message: Value = serde_json::from_str(&data.join("\n")).ok()?;
        if message.get("method").is_some() || message.get("id") != Some(&self.id) {
            return None;
        }
        patch_response(self.patch, &mut message);
        let mut out = String::new();
        let mut data_written = false;
        for line in lines.iter().filter(|line| !line.is_empty()) {
            if data_of(line).is_some() {
                // serde_json writes no raw newline, so one `data:` line holds it all.
                if !data_written {
                    out.push_str(&format!("data: {message}\n"));
                    data_written = true;
                }
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
        Some(out.into_bytes())
    }
}

/// The value of a `data:` field line.
fn data_of(line: &str) -> Option<&str> {
    let value = line.strip_prefix("data")?;
    if value.is_empty() {
        return Some("");
    }
    let value = value.strip_prefix(':')?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

/// Where the first complete event in `buffer` ends: just after its blank line (`\n` or
/// `\r\n` line ends).
fn event_end(buffer: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(at) = buffer[start..].iter().position(|&b| b == b'\n') {
        let end = start + at;
        let line = &buffer[start..end];
        if line.is_empty() || line == b"\r" {
            return Some(end + 1);
        }
        start = end + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOOLS: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"complete"},{"name":"list_models"}]}}"#;

    /// `input` fed in pieces of `size` bytes, all output joined.
    fn through(input: &[u8], size: usize, id: Value) -> Vec<u8> {
        let mut sse = SsePatch::new(Patch::ToolsList, id);
        let mut out = Vec::new();
        for chunk in input.chunks(size) {
            out.extend(sse.feed(chunk));
        }
        out.extend(sse.finish());
        out
    }

    fn events(bytes: &[u8]) -> Vec<String> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .split_inclusive("\n\n")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn only_the_answer_is_rewritten_and_everything_else_is_byte_identical() {
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"id":2}}"#;
        let other = r#"{"jsonrpc":"2.0","id":3,"result":{}}"#;
        let input = format!(
            "id: 0\nretry: 3000\ndata:\n\n: keep-alive\n\ndata:{progress}\n\nid: 1\ndata: {other}\n\n\
             event: message\nid: 2\ndata: {TOOLS}\n\ndata: {TOOLS}\n\n"
        );
        for size in [1, 2, 7, 64, input.len()] {
            let out = through(input.as_bytes(), size, json!(2));
            let (before, after) = (events(input.as_bytes()), events(&out));
            assert_eq!(after.len(), before.len(), "chunks of {size}");
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if i == 4 {
                    assert!(a.starts_with("event: message\nid: 2\ndata: {"), "{a}");
                    let data: Value = serde_json::from_str(
                        a.lines().nth(2).unwrap().strip_prefix("data: ").unwrap(),
                    )
                    .unwrap();
                    assert_eq!(
                        data["result"]["tools"][0]["execution"]["taskSupport"],
                        "optional"
                    );
                    assert!(data["result"]["tools"][1].get("execution").is_none());
                } else {
                    // The answer after the patched one is not looked at again.
                    assert_eq!(a, b, "event {i}, chunks of {size}");
                }
            }
        }
    }

    #[test]
    fn multi_line_data_and_crlf_are_read_and_a_cut_off_stream_passes_as_it_came() {
        let split = TOOLS.replacen(",\"result\"", "\r\ndata: ,\"result\"", 1);
        let input = format!("id: 9\r\ndata: {split}\r\n\r\ndata: {{\"cut");
        let out = String::from_utf8(through(input.as_bytes(), 5, json!(2))).unwrap();
        let (event, rest) = out.split_once("\n\n").unwrap();
        assert!(event.starts_with("id: 9\ndata: "), "{event}");
        assert!(event.contains("\"taskSupport\":\"optional\""), "{event}");
        assert_eq!(rest, "data: {\"cut");
    }

    #[test]
    fn a_stream_without_the_answer_is_unchanged() {
        let input = format!("data: {TOOLS}\n\ndata: not json\n\n:\n\n");
        for id in [json!(7), json!("2")] {
            assert_eq!(through(input.as_bytes(), 3, id), input.as_bytes());
        }
    }

    #[test]
    fn data_fields_are_read_as_the_sse_spec_says() {
        assert_eq!(data_of("data: x"), Some("x"));
        assert_eq!(data_of("data:x"), Some("x"));
        assert_eq!(data_of("data:  x"), Some(" x"));
        assert_eq!(data_of("data"), Some(""));
        assert_eq!(data_of("database: x"), None);
        assert_eq!(data_of("id: 1"), None);
        assert_eq!(event_end(b"a\n\nb"), Some(3));
        assert_eq!(event_end(b"a\r\n\r\nb"), Some(5));
        assert_eq!(event_end(b"a\nb\n"), None);
    }
}
