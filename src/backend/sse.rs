//! Server-sent events as OpenAI-compatible hosts send them, and the chat stream they carry.
//!
//! Two layers: [`SseDecoder`] turns bytes into events (the `data:` fields, and the `error:` field
//! llama.cpp uses), and [`ChatStream`] folds payloads into text, reasoning, tool calls, finish
//! reason and usage. Both are plain data structures, so every quirk of real hosts is unit-tested
//! without a socket: `choices: null` or `[]`, usage-only chunks, bad JSON lines, comments,
//! `event:` lines, CRLF, events split across reads, tool-call deltas that arrive in fragments,
//! parallel calls that share an index, `finish_reason: ""` on every chunk, and errors in each of
//! the shapes servers send them.

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::Value;

use crate::task::{ToolCall, Usage};

/// Longest SSE line accepted; a host that sends more without a newline is broken.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct LineTooLong;

/// One event of a chat stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The `data:` payload of an event (a JSON chunk or `[DONE]`).
    Data(String),
    /// The value of an `error:` field. llama.cpp's server reports a failure inside an HTTP 200
    /// stream this way (`error: {"code":400,"message":...}` then `data: [DONE]`; see
    /// `format_sse`/`send_error` in llama.cpp's `tools/server`), which a client that reads
    /// only `data:` would take for an empty, complete answer.
    Error(String),
}

/// Splits a byte stream into SSE events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    event: Pending,
    /// Bytes of the lines of the event being assembled that were already read (its
    /// unfinished part, with the unread `buf`).
    event_bytes: usize,
}

/// The event being assembled.
#[derive(Debug, Default)]
struct Pending {
    data: Option<String>,
    /// It was announced with `event: error` (the SSE way to type an event, which some servers
    /// use for failures): its data is the error, even if it is not JSON.
    error: bool,
}

impl Pending {
    fn emit(&mut self, data: String, out: &mut Vec<SseEvent>) {
        if std::mem::take(&mut self.error) {
            out.push(SseEvent::Error(data));
        } else {
            out.push(SseEvent::Data(data));
        }
    }
}

impl SseDecoder {
    /// Feeds bytes; complete events are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), LineTooLong> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(rel) = self.buf[self.scanned.max(start)..]
            .iter()
            .position(|b| *b == b'\n')
        {
            let end = self.scanned.max(start) + rel;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            // Borrowed unless the host sent invalid UTF-8: no copy of the line.
            let line = String::from_utf8_lossy(line);
            take_line(&mut self.event, &line, out);
            // A line that leaves no event half built (the blank line that ends one, a comment
            // between events) ends what a relay must hold back.
            if self.event.data.is_some() || self.event.error {
                self.event_bytes += end + 1 - start;
            } else {
                self.event_bytes = 0;
            }
            start = end + 1;
            self.scanned = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_LINE_BYTES {
            return Err(LineTooLong);
        }
        Ok(())
    }

    /// Whether everything pushed so far ended an event: no line or event is half read.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.event.data.is_none()
    }

    /// How many of the bytes pushed so far belong to an event not yet complete (its lines
    /// read so far and the line half read): the last bytes a relay holds back, so that the
    /// events it sends are whole whatever the reads cut.
    pub fn unfinished_bytes(&self) -> usize {
        self.event_bytes + self.buf.len()
    }

    /// The stream ended: a final event without its blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(&rest)
                .trim_end_matches('\r')
                .to_string();
            take_line(&mut self.event, &line, out);
        }
        if let Some(data) = self.event.data.take() {
            self.event.emit(data, out);
        }
    }
}

/// One line of the stream into the event being assembled; a complete event goes to `out`.
/// A free function over the one field it changes, so that `push` can pass a line still borrowed
/// from the decoder's buffer.
fn take_line(event: &mut Pending, line: &str, out: &mut Vec<SseEvent>) {
    if line.is_empty() {
        match event.data.take() {
            Some(data) => event.emit(data, out),
            None => event.error = false,
        }
        return;
    }
    if line.starts_with(':') {
        return; // comment / keep-alive
    }
    let (field, value) = match line.split_once(':') {
        Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
        None => (line, ""),
    };
    if field == "error" {
        // Reported at once: whatever the event also carries, the answer has failed.
        if let Some(data) = event.data.take() {
            event.emit(data, out);
        }
        out.push(SseEvent::Error(value.to_string()));
        return;
    }
    if field == "event" {
        event.error |= value == "error";
        return;
    }
    if field != "data" {
        return; // id:, retry: carry nothing we use
    }
    match &mut event.data {
        // Some hosts omit the blank line between events; a complete JSON payload followed
        // by another data line is then two events, not one multi-line event.
        Some(pending) if is_complete_payload(pending) => {
            let complete = std::mem::replace(pending, value.to_string());
            event.emit(complete, out);
        }
        Some(pending) => {
            pending.push('\n');
            pending.push_str(value);
        }
        None => event.data = Some(value.to_string()),
    }
}

fn is_complete_payload(data: &str) -> bool {
    data.trim() == "[DONE]" || serde_json::from_str::<serde::de::IgnoredAny>(data).is_ok()
}

/// What one payload changed, for the caller to forward as it arrives.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// Where this chunk's text lies in [`ChatStream::text`] (a range, not a copy: a relayed
    /// task never needs the piece on its own).
    pub content: Option<Range<usize>>,
    /// Where this chunk's reasoning lies in [`ChatStream::reasoning`].
    pub reasoning: Option<Range<usize>>,
    /// A tool-call fragment arrived (it counts as output for time-to-first-token).
    pub tool_call: bool,
    /// The payload with its tool-call indices corrected, when a fragment belongs to a call
    /// this stream gave another index (parallel calls a server sent at one index): what an
    /// OpenAI client should receive instead, since it accumulates calls by index.
    pub reindexed: Option<String>,
}

#[derive(Debug, Default, Clone)]
struct ToolCallParts {
    /// The index this call has for clients: the host's, unless the host reused an index that
    /// an earlier call holds (then the next free one).
    index: u64,
    id: Option<String>,
    name: String,
    arguments: String,
}

/// The chat completion being assembled from its chunks.
#[derive(Debug, Default)]
pub struct ChatStream {
    pub text: String,
    pub reasoning: String,
    /// Calls in the order they started.
    tool_calls: Vec<ToolCallParts>,
    /// The call each stream index currently feeds (a position in `tool_calls`).
    call_at_index: BTreeMap<u64, usize>,
    /// A real finish reason (a non-empty string): the host said the answer is complete.
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// `[DONE]` arrived.
    pub done: bool,
    /// Payloads that were not JSON; skipped, counted for the log.
    pub bad_payloads: usize,
    /// The host ended the answer with a finish reason that says it did not finish it
    /// (`"abort"`, `"error"`): a cut answer, whatever follows.
    pub aborted: Option<String>,
}

/// An error the host reported inside its answer (an `{"error": ...}` chunk, an `error:` field,
/// or a 200 whose body is an error), with the host's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InStreamError(pub HostMessage);

/// A host's error in its own words, from whichever shape it used (see [`host_message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMessage {
    pub message: String,
    /// The HTTP status the host gave the error inside the body (`"code": 400`), if any.
    pub code: Option<u16>,
}

impl ChatStream {
    pub fn apply(&mut self, payload: &str) -> Result<Applied, InStreamError> {
        let payload = payload.trim();
        if payload == "[DONE]" {
            self.done = true;
            return Ok(Applied::default());
        }
        let Ok(chunk) = serde_json::from_str::<Value>(payload) else {
            self.bad_payloads += 1;
            return Ok(Applied::default());
        };
        if let Some(error) = error_payload(&chunk) {
            return Err(InStreamError(error));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object())
            && let Ok(usage) = serde_json::from_value::<Usage>(usage.clone())
        {
            self.usage = Some(usage);
        }
        let mut applied = Applied::default();
        let mut renumbered = Vec::new();
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(applied);
        };
        // Non-streaming answers carry `message`; a host that ignored `stream: true` sends one.
        let delta = choice.get("delta").or_else(|| choice.get("message"));
        if let Some(delta) = delta {
            if let Some(text) = delta
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                let start = self.text.len();
                self.text.push_str(text);
                applied.content = Some(start..self.text.len());
            }
            let reasoning = delta
                .get("reasoning_content")
                .or_else(|| delta.get("reasoning"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty());
            if let Some(text) = reasoning {
                let start = self.reasoning.len();
                self.reasoning.push_str(text);
                applied.reasoning = Some(start..self.reasoning.len());
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (position, call) in calls.iter().enumerate() {
                    if let Some(index) = self.tool_call_delta(position as u64, call) {
                        renumbered.push((position, index));
                    }
                    applied.tool_call = true;
                }
            }
        }
        // Some servers put `"finish_reason": ""` on every intermediate chunk: only a real
        // reason says the answer is complete, or a cut stream would pass for a whole one.
        // vLLM ends a request its engine aborted (a pause, a shutdown, an abort request) with
        // `"finish_reason": "abort"` and then `[DONE]` (vllm-project/vllm#57082): not a finish.
        match choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            Some(reason @ ("abort" | "error")) => self.aborted = Some(reason.to_string()),
            Some(reason) => self.finish_reason = Some(reason.to_string()),
            None => {}
        }
        if !renumbered.is_empty() {
            let mut fixed = chunk.clone();
            for (position, index) in renumbered {
                let call = &mut fixed["choices"][0]["delta"]["tool_calls"][position];
                if call.is_object() {
                    call["index"] = index.into();
                }
            }
            applied.reindexed = Some(fixed.to_string());
        }
        Ok(applied)
    }

    /// The value of an `error:` field: the error object itself (llama.cpp) or `{"error": ...}`.
    pub fn error_field(&self, value: &str) -> InStreamError {
        let message = match serde_json::from_str::<Value>(value) {
            Ok(value) => error_payload(&value).or_else(|| host_message(&value)),
            Err(_) => None,
        };
        InStreamError(message.unwrap_or_else(|| HostMessage {
            message: value.trim().to_string(),
            code: None,
        }))
    }

    /// Folds one fragment in; returns the index clients should see for it when that is not
    /// the host's.
    fn tool_call_delta(&mut self, position: u64, call: &Value) -> Option<u64> {
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(position);
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        // A fragment at an index in use that names another call starts a new call: Ollama
        // streams parallel calls whole, each in its own chunk, all with `"index": 0`
        // (ollama/ollama#15457); gluing them would make one call with invalid
        // arguments and lose the others.
        // Without ids, a fragment that names a call while the call at its index is already
        // named and its arguments already whole JSON is the next call (Ollama without ids);
        // a server that repeats the name on every fragment of one call has unfinished
        // arguments in between, so it is not split.
        let named = call
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let current = self.call_at_index.get(&index).copied().filter(|&at| {
            let existing = &self.tool_calls[at];
            match (&existing.id, id) {
                (Some(existing), Some(id)) => existing == id,
                _ => {
                    !(named
                        && !existing.name.is_empty()
                        // Cheap test first: some servers repeat the name on every fragment.
                        && existing.arguments.trim_end().ends_with('}')
                        && serde_json::from_str::<serde::de::IgnoredAny>(&existing.arguments)
                            .is_ok())
                }
            }
        });
        let at = current.unwrap_or_else(|| {
            let taken = self.tool_calls.iter().any(|c| c.index == index);
            let client_index = if taken {
                self.tool_calls
                    .iter()
                    .map(|c| c.index + 1)
                    .max()
                    .unwrap_or(0)
            } else {
                index
            };
            self.tool_calls.push(ToolCallParts {
                index: client_index,
                ..ToolCallParts::default()
            });
            self.call_at_index.insert(index, self.tool_calls.len() - 1);
            self.tool_calls.len() - 1
        });
        let parts = &mut self.tool_calls[at];
        let reindexed = (parts.index != index).then_some(parts.index);
        if let Some(id) = id {
            parts.id.get_or_insert_with(|| id.to_string());
        }
        let function = call.get("function");
        if let Some(name) = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            parts.name = name.to_string();
        }
        match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(fragment)) => parts.arguments.push_str(fragment),
            // Some servers send whole arguments as an object in one delta.
            Some(v @ Value::Object(_)) => parts.arguments.push_str(&v.to_string()),
            _ => {}
        }
        reindexed
    }

    /// Tool calls in the order they started; fragments without a name are not calls.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        self.tool_calls
            .iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| ToolCall {
                id: p.id.clone(),
                name: p.name.clone(),
                arguments: p.arguments.clone(),
            })
            .collect()
    }

    /// Whether the model produced anything at all.
    pub fn has_output(&self) -> bool {
        !self.text.is_empty() || !self.reasoning.is_empty() || !self.tool_calls.is_empty()
    }

    /// The host said the answer is complete.
    pub fn complete(&self) -> bool {
        (self.done || self.finish_reason.is_some()) && self.aborted.is_none()
    }
}

/// The error a chunk (or a whole JSON answer) carries, if it is one: `{"error": ...}` with a
/// non-null value (OpenAI, llama.cpp, LM Studio, Ollama), or vLLM's top-level
/// `{"object": "error", "message": ..., "code": 400}` (vLLM's `ErrorResponse`).
pub fn error_payload(chunk: &Value) -> Option<HostMessage> {
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        return Some(error_value(error));
    }
    if chunk.get("object").and_then(Value::as_str) == Some("error") {
        return host_message(chunk);
    }
    None
}

/// A host's error message from any of the shapes servers use, for HTTP error bodies and
/// in-stream errors alike:
/// - `{"error": {"message": ..., "type": ..., "code": 400}}` — OpenAI, llama.cpp, LM Studio;
/// - `{"error": "..."}` — LM Studio (unknown endpoints), Ollama;
/// - `{"object": "error", "message": ..., "type": "BadRequestError", "code": 400}` — vLLM;
/// - `{"detail": "..."}` or `{"detail": [{"msg": ...}]}` — FastAPI servers (vLLM's routes);
/// - `{"message": ..., "code": ...}` — the bare error object of llama.cpp's `error:` field.
///
/// `None` when the value holds none of these.
pub fn host_message(body: &Value) -> Option<HostMessage> {
    if let Some(error) = body.get("error").filter(|e| !e.is_null()) {
        return Some(error_value(error));
    }
    let object = body.as_object()?;
    if let Some(message) = object.get("message").and_then(Value::as_str) {
        return Some(HostMessage {
            message: message.to_string(),
            code: status_code(object.get("code"), object.get("type")),
        });
    }
    match object.get("detail")? {
        Value::String(detail) => Some(HostMessage {
            message: detail.clone(),
            code: None,
        }),
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|item| {
                    let msg = item.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                    match item.get("loc").and_then(Value::as_array) {
                        Some(loc) => {
                            let loc: Vec<String> = loc
                                .iter()
                                .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_string))
                                .collect();
                            format!("{}: {msg}", loc.join("."))
                        }
                        None => msg.to_string(),
                    }
                })
                .collect();
            Some(HostMessage {
                message: parts.join("; "),
                code: None,
            })
        }
        other => Some(HostMessage {
            message: other.to_string(),
            code: None,
        }),
    }
}

/// The value of an `"error"` key: an object with a message, or a bare string.
fn error_value(error: &Value) -> HostMessage {
    match error {
        Value::String(s) => HostMessage {
            message: s.clone(),
            code: None,
        },
        Value::Object(o) => HostMessage {
            message: o
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string()),
            code: status_code(o.get("code"), o.get("type")),
        },
        other => HostMessage {
            message: other.to_string(),
            code: None,
        },
    }
}

/// The HTTP status an error stands for: its `code` when that is a status (llama.cpp and vLLM
/// put one there; OpenAI puts a string such as `"context_length_exceeded"`, which is not one),
/// corrected by its `type` where the two disagree: llama.cpp has reported a prompt over the
/// context size as `"code": 500` with `"type": "exceed_context_size_error"`
/// (ggml-org/llama.cpp#15780, #19774), which is the request's fault, not the server's.
fn status_code(code: Option<&Value>, kind: Option<&Value>) -> Option<u16> {
    let code = code
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c));
    let by_kind = match kind.and_then(Value::as_str) {
        Some("exceed_context_size_error" | "invalid_request_error" | "BadRequestError") => {
            Some(400)
        }
        Some("not_found_error" | "NotFoundError") => Some(404),
        _ => None,
    };
    match (code, by_kind) {
        (Some(code), _) if code < 500 => Some(code),
        (_, Some(status)) => Some(status),
        (code, None) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c, &mut out).unwrap();
        }
        d.finish(&mut out);
        out
    }

    /// The `data:` payloads only.
    fn decode(chunks: &[&[u8]]) -> Vec<String> {
        events(chunks)
            .into_iter()
            .map(|e| match e {
                SseEvent::Data(d) => d,
                SseEvent::Error(e) => panic!("unexpected error event {e}"),
            })
            .collect()
    }

    #[test]
    fn a_relay_holds_back_exactly_the_unfinished_event() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        // A whole event, then an event cut inside its second data line.
        let first = b"data: {\"a\":1}\n\n";
        let cut = b"data: {\"b\":\ndata: 2";
        d.push(first, &mut out).unwrap();
        assert_eq!(d.unfinished_bytes(), 0);
        d.push(cut, &mut out).unwrap();
        assert_eq!(d.unfinished_bytes(), cut.len(), "the cut event, whole");
        d.push(b"}\n\n: ping\n", &mut out).unwrap();
        assert_eq!(d.unfinished_bytes(), 0, "ended, and a comment is no event");
        d.push(b"event: error\nda", &mut out).unwrap();
        assert_eq!(d.unfinished_bytes(), b"event: error\nda".len());
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn events_split_anywhere_and_crlf() {
        let out = decode(&[b"data: {\"a\"", b":1}\r\n\r", b"\ndata: [DO", b"NE]\n\n"]);
        assert_eq!(out, vec!["{\"a\":1}", "[DONE]"]);
    }

    #[test]
    fn comments_event_lines_and_missing_blank_lines() {
        let out = decode(&[
            b": keep-alive\n\nevent: ping\ndata: {\"x\":1}\ndata: {\"y\":2}\n\ndata: [DONE]",
        ]);
        assert_eq!(out, vec!["{\"x\":1}", "{\"y\":2}", "[DONE]"]);
    }

    #[test]
    fn multi_line_data_is_joined() {
        let out = decode(&[b"data: {\"x\":\ndata: 1}\n\n"]);
        assert_eq!(out, vec!["{\"x\":\n1}"]);
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        let big = vec![b'a'; MAX_LINE_BYTES / 4];
        for _ in 0..4 {
            d.push(&big, &mut out).unwrap();
        }
        assert_eq!(d.push(b"a", &mut out), Err(LineTooLong));
    }

    #[test]
    fn invalid_utf8_lines_are_skipped_not_fatal() {
        let out = decode(&[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n",
            b"data: \xc3\x28\n\n",
        ]);
        let mut s = ChatStream::default();
        for p in &out {
            s.apply(p).unwrap();
        }
        // Lossy decoding keeps the valid JSON (with replacement characters); the rest is skipped.
        assert_eq!(s.text, "\u{fffd}\u{fffd}");
        assert_eq!(s.bad_payloads, 1);
    }

    #[test]
    fn tolerant_of_null_and_empty_choices_and_bad_json() {
        let mut s = ChatStream::default();
        for p in [
            r#"{"choices":null}"#,
            r#"{"choices":[]}"#,
            "{not json",
            r#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#,
            r#"{"choices":[{"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"delta":{"content":"lo"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            "[DONE]",
        ] {
            s.apply(p).unwrap();
        }
        assert_eq!(s.text, "Hello");
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert_eq!(s.usage.unwrap().total_tokens, 5);
        assert_eq!(s.bad_payloads, 1);
        assert!(s.done && s.complete());
    }

    #[test]
    fn tool_call_fragments_accumulate_by_index() {
        let mut s = ChatStream::default();
        for p in [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"read_file","arguments":"{\"pa"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_2","function":{"name":"ls","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"th\":\"./1.txt\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":2,"function":{"arguments":"orphan"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ] {
            s.apply(p).unwrap();
        }
        let calls = s.tool_calls();
        assert_eq!(calls.len(), 2, "a fragment without a name is not a call");
        assert_eq!(calls[0].id.as_deref(), Some("call_1"));
        assert_eq!(calls[0].name, "read_file");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["path"], "./1.txt");
        assert_eq!(calls[1].name, "ls");
        assert!(s.has_output());
    }

    #[test]
    fn reasoning_is_kept_apart_from_text() {
        let mut s = ChatStream::default();
        let a = s
            .apply(r#"{"choices":[{"delta":{"reasoning_content":"think"}}]}"#)
            .unwrap();
        assert_eq!(a.reasoning.map(|r| &s.reasoning[r]), Some("think"));
        s.apply(r#"{"choices":[{"delta":{"content":"answer"}}]}"#)
            .unwrap();
        assert_eq!((s.reasoning.as_str(), s.text.as_str()), ("think", "answer"));
    }

    #[test]
    fn in_stream_error_chunks_are_errors() {
        let mut s = ChatStream::default();
        let e = s
            .apply(r#"{"error":{"message":"Model unloaded","type":"server_error"}}"#)
            .unwrap_err();
        assert_eq!(
            e.0,
            HostMessage {
                message: "Model unloaded".into(),
                code: None
            }
        );
        let e = s
            .apply(r#"{"error":"Unexpected endpoint or method. (POST /x)"}"#)
            .unwrap_err();
        assert!(e.0.message.contains("Unexpected endpoint"));
        // vLLM's top-level error object, sent as a data payload.
        let e = s
            .apply(r#"{"object":"error","message":"max context 2048","type":"BadRequestError","param":null,"code":400}"#)
            .unwrap_err();
        assert_eq!(
            (e.0.message.as_str(), e.0.code),
            ("max context 2048", Some(400))
        );
    }

    /// llama.cpp's exact bytes for a prompt over the context size: an `error:` field inside an
    /// HTTP 200 stream, then `data: [DONE]`.
    #[test]
    fn llama_cpp_error_field_is_an_error_event() {
        let bytes = b"error: {\"code\":400,\"message\":\"the request exceeds the available context size. try increasing the context size or enable context shift\",\"type\":\"invalid_request_error\"}\n\ndata: [DONE]\n\n";
        let out = events(&[bytes]);
        assert_eq!(out.len(), 2, "{out:?}");
        let SseEvent::Error(value) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(out[1], SseEvent::Data("[DONE]".into()));
        let e = ChatStream::default().error_field(value);
        assert_eq!(e.0.code, Some(400));
        assert!(
            e.0.message
                .starts_with("the request exceeds the available context size")
        );
        // Tokens first, then the error: the pending data event is not lost or merged.
        let out = events(&[b"data: {\"x\":1}\nerror: boom\n\n"]);
        assert_eq!(
            out,
            vec![
                SseEvent::Data("{\"x\":1}".into()),
                SseEvent::Error("boom".into())
            ]
        );
        assert_eq!(ChatStream::default().error_field("boom").0.message, "boom");
        // `event: error` types the event: its data is the error, JSON or not.
        let out = events(&[b"event: error\ndata: model crashed\n\nevent: ping\ndata: {}\n\n"]);
        assert_eq!(
            out,
            vec![
                SseEvent::Error("model crashed".into()),
                SseEvent::Data("{}".into())
            ]
        );
    }

    /// The same without ids: still two calls; a name repeated mid-call does not split it.
    #[test]
    fn parallel_calls_without_ids_at_one_index_stay_apart() {
        let mut s = ChatStream::default();
        for chunk in [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"read","arguments":"{\"f\":\"a\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"read","arguments":"{\"f\":\"b\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"name":"ls","arguments":"{\"p"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"name":"ls","arguments":"\":1}"}}]}}]}"#,
        ] {
            s.apply(chunk).unwrap();
        }
        let calls = s.tool_calls();
        let args: Vec<&str> = calls.iter().map(|c| c.arguments.as_str()).collect();
        assert_eq!(args, [r#"{"f":"a"}"#, r#"{"f":"b"}"#, r#"{"p":1}"#]);
    }

    /// Ollama's two parallel calls, each whole in its own chunk, both at index 0.
    #[test]
    fn parallel_calls_sharing_an_index_stay_apart() {
        let mut s = ChatStream::default();
        for p in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_a1","index":0,"type":"function","function":{"name":"read","arguments":"{\"filePath\":\"hello.py\"}"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_b2","index":0,"type":"function","function":{"name":"read","arguments":"{\"filePath\":\"world.py\"}"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls"}]}"#,
        ] {
            s.apply(p).unwrap();
        }
        let calls = s.tool_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].id.as_deref(), Some("call_a1"));
        assert_eq!(calls[0].arguments, r#"{"filePath":"hello.py"}"#);
        assert_eq!(calls[1].id.as_deref(), Some("call_b2"));
        assert_eq!(calls[1].arguments, r#"{"filePath":"world.py"}"#);
        // For relayed clients, which accumulate by index, the second call gets index 1.
        let mut s = ChatStream::default();
        let first = s.apply(r#"{"choices":[{"delta":{"tool_calls":[{"id":"a","index":0,"function":{"name":"f","arguments":"{}"}}]}}]}"#).unwrap();
        assert_eq!(first.reindexed, None);
        let second = s.apply(r#"{"choices":[{"delta":{"tool_calls":[{"id":"b","index":0,"function":{"name":"g","arguments":"{}"}}]}}]}"#).unwrap();
        let fixed: Value = serde_json::from_str(&second.reindexed.unwrap()).unwrap();
        assert_eq!(fixed["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
        assert_eq!(fixed["choices"][0]["delta"]["tool_calls"][0]["id"], "b");
        // The same id again, or no id, continues the current call.
        let mut s = ChatStream::default();
        for p in [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"arguments":":1"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"","function":{"arguments":"}"}}]}}]}"#,
        ] {
            s.apply(p).unwrap();
        }
        assert_eq!(s.tool_calls().len(), 1);
        assert_eq!(s.tool_calls()[0].arguments, r#"{"a":1}"#);
    }

    #[test]
    fn an_empty_finish_reason_is_no_finish() {
        let mut s = ChatStream::default();
        for p in [
            r#"{"choices":[{"delta":{"content":"Hel"},"finish_reason":""}]}"#,
            r#"{"choices":[{"delta":{"content":"lo"},"finish_reason":""}]}"#,
        ] {
            s.apply(p).unwrap();
        }
        assert_eq!(s.finish_reason, None);
        assert!(
            !s.complete(),
            "a cut stream with empty reasons is not complete"
        );
        // vLLM's engine-side abort: a reason that says the answer was not finished.
        let mut aborted = ChatStream::default();
        for p in [
            r#"{"choices":[{"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"abort"}]}"#,
            "[DONE]",
        ] {
            aborted.apply(p).unwrap();
        }
        assert_eq!(aborted.aborted.as_deref(), Some("abort"));
        assert!(!aborted.complete(), "[DONE] after an abort is no finish");
        s.apply(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#)
            .unwrap();
        assert!(s.complete());
    }

    #[test]
    fn host_messages_from_every_shape() {
        let cases = [
            (
                json!({"object":"error","message":"This model's maximum context length is 2048 tokens.","type":"BadRequestError","param":null,"code":400}),
                "This model's maximum context length is 2048 tokens.",
                Some(400),
            ),
            (
                json!({"error":{"code":400,"message":"model 'x' not found","type":"invalid_request_error"}}),
                "model 'x' not found",
                Some(400),
            ),
            (
                json!({"error":{"message":"bad","type":"invalid_request_error","param":null,"code":"context_length_exceeded"}}),
                "bad",
                Some(400),
            ),
            (
                json!({"error":"Unexpected endpoint"}),
                "Unexpected endpoint",
                None,
            ),
            (json!({"detail":"Not Found"}), "Not Found", None),
            (
                json!({"detail":[{"loc":["body","messages"],"msg":"Field required","type":"missing"}]}),
                "body.messages: Field required",
                None,
            ),
        ];
        for (body, message, code) in cases {
            let m = host_message(&body).unwrap();
            assert_eq!((m.message.as_str(), m.code), (message, code), "{body}");
        }
        assert_eq!(host_message(&json!({"data": []})), None);
        // llama.cpp's context overflow as a 500: the request's fault all the same.
        let m = host_message(&json!({"error":{"code":500,"message":"the request exceeds the available context size","type":"exceed_context_size_error","n_prompt_tokens":1407,"n_ctx":256}})).unwrap();
        assert_eq!(m.code, Some(400));
        let m = host_message(&json!({"error":{"code":500,"message":"Context size has been exceeded.","type":"server_error"}})).unwrap();
        assert_eq!(m.code, Some(500));
        let m = host_message(
            &json!({"error":{"message":"no such model","type":"invalid_request_error"}}),
        )
        .unwrap();
        assert_eq!(m.code, Some(400));
    }
}
