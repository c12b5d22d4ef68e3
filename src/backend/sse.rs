//! Server-sent events as OpenAI-compatible hosts send them, and the chat stream they carry.
//!
//! Two layers: [`SseDecoder`] turns bytes into event payloads (the `data:` fields), and
//! [`ChatStream`] folds payloads into text, reasoning, tool calls, finish reason and usage. Both
//! are plain data structures, so every quirk of real hosts is unit-tested without a socket:
//! `choices: null` or `[]`, usage-only chunks, bad JSON lines, comments, `event:` lines, CRLF,
//! events split across reads, and tool-call deltas that arrive in fragments.

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::Value;

use crate::task::{ToolCall, Usage};

/// Longest SSE line accepted; a host that sends more without a newline is broken.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct LineTooLong;

/// Splits a byte stream into SSE event payloads.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds bytes; complete events are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), LineTooLong> {
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
            take_line(&mut self.data, &line, out);
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

    /// The stream ended: a final event without its blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(&rest)
                .trim_end_matches('\r')
                .to_string();
            take_line(&mut self.data, &line, out);
        }
        if let Some(data) = self.data.take() {
            out.push(data);
        }
    }
}

/// One line of the stream into the event being assembled (`data`); a complete event goes to `out`.
/// A free function over the one field it changes, so that `push` can pass a line still borrowed
/// from the decoder's buffer.
fn take_line(data: &mut Option<String>, line: &str, out: &mut Vec<String>) {
    if line.is_empty() {
        if let Some(data) = data.take() {
            out.push(data);
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
    if field != "data" {
        return; // event:, id:, retry: carry nothing we use
    }
    match data {
        // Some hosts omit the blank line between events; a complete JSON payload followed
        // by another data line is then two events, not one multi-line event.
        Some(pending) if is_complete_payload(pending) => {
            out.push(std::mem::replace(pending, value.to_string()));
        }
        Some(pending) => {
            pending.push('\n');
            pending.push_str(value);
        }
        None => *data = Some(value.to_string()),
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
}

#[derive(Debug, Default, Clone)]
struct ToolCallParts {
    id: Option<String>,
    name: String,
    arguments: String,
}

/// The chat completion being assembled from its chunks.
#[derive(Debug, Default)]
pub struct ChatStream {
    pub text: String,
    pub reasoning: String,
    tool_calls: BTreeMap<u64, ToolCallParts>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// `[DONE]` arrived.
    pub done: bool,
    /// Payloads that were not JSON; skipped, counted for the log.
    pub bad_payloads: usize,
}

/// An `{"error": ...}` chunk inside the stream, with the host's message.
#[derive(Debug, PartialEq, Eq)]
pub struct InStreamError(pub String);

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
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(InStreamError(error_message(error)));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object())
            && let Ok(usage) = serde_json::from_value::<Usage>(usage.clone())
        {
            self.usage = Some(usage);
        }
        let mut applied = Applied::default();
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
                    self.tool_call_delta(position as u64, call);
                    applied.tool_call = true;
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
        Ok(applied)
    }

    fn tool_call_delta(&mut self, position: u64, call: &Value) {
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(position);
        let parts = self.tool_calls.entry(index).or_default();
        if let Some(id) = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
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
    }

    /// Tool calls in index order; fragments without a name are not calls.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        self.tool_calls
            .values()
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
        self.done || self.finish_reason.is_some()
    }
}

/// The human part of an OpenAI-style error value: `{"message": ...}` or a bare string.
pub fn error_message(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c, &mut out).unwrap();
        }
        d.finish(&mut out);
        out
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
        assert_eq!(e, InStreamError("Model unloaded".into()));
        let e = s
            .apply(r#"{"error":"Unexpected endpoint or method. (POST /x)"}"#)
            .unwrap_err();
        assert!(e.0.contains("Unexpected endpoint"));
    }
}
