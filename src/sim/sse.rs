//! The streaming answer: a script rendered to server-sent-event frames the
//! way LM Studio (llama.cpp) writes them, played out with real delays.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use futures::stream;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::record::Outcome;
use super::reply::abort_frame;
use super::script::{Ending, Piece, Script};
use super::state::{RecordGuard, wait_evicted};

/// One thing the stream does.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Wait `delay`, then send `text`; `content` marks a content token.
    Frame {
        delay: Duration,
        text: String,
        content: bool,
    },
    /// Send nothing more, keeping the connection open.
    Hang,
    /// Break the body off.
    Abort(Outcome),
    /// End the body cleanly.
    End(Outcome),
}

/// Streams `script` as the answer. The record guard lives in the body, so the
/// body being dropped early (client gone) is what records the disconnect.
pub(crate) fn respond(
    guard: RecordGuard,
    script: &Script,
    evicted: watch::Receiver<bool>,
) -> Response {
    guard.first_byte();
    let player = Player {
        steps: steps(script).into_iter(),
        guard,
        evicted,
    };
    let body = Body::from_stream(stream::unfold(player, Player::next_frame));
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

struct Player {
    steps: std::vec::IntoIter<Step>,
    guard: RecordGuard,
    evicted: watch::Receiver<bool>,
}

type Frame = Result<String, io::Error>;

impl Player {
    async fn next_frame(mut self) -> Option<(Frame, Self)> {
        let Some(step) = self.steps.next() else {
            // Only after an abort: the plan always ends with End, Abort or Hang.
            return None;
        };
        match step {
            Step::Frame {
                delay,
                text,
                content,
            } => {
                if self.wait(delay).await {
                    return self.abort(Outcome::Evicted).await;
                }
                if content {
                    self.guard.update(|record| record.tokens_sent += 1);
                }
                Some((Ok(text), self))
            }
            Step::Hang => {
                wait_evicted(&mut self.evicted).await;
                self.abort(Outcome::Evicted).await
            }
            Step::Abort(outcome) => self.abort(outcome).await,
            Step::End(outcome) => {
                self.guard.finish(outcome);
                None
            }
        }
    }

    /// Sleeps for `delay`; true if the request was evicted meanwhile.
    async fn wait(&mut self, delay: Duration) -> bool {
        if delay.is_zero() {
            return *self.evicted.borrow();
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = wait_evicted(&mut self.evicted) => true,
        }
    }

    async fn abort(mut self, outcome: Outcome) -> Option<(Frame, Self)> {
        self.guard.finish(outcome);
        self.steps = Vec::new().into_iter();
        Some((abort_frame().await, self))
    }
}

/// The frames of `script`, in order, ending with `End`, `Abort` or `Hang`.
fn steps(script: &Script) -> Vec<Step> {
    let mut steps = vec![frame(
        Duration::ZERO,
        &chunk(script, json!({"role": "assistant", "content": null}), None),
    )];
    if script.garbage_line_bytes > 0 {
        steps.push(raw(format!(
            "data: {}\n\n",
            "x".repeat(script.garbage_line_bytes)
        )));
    }
    // Spread the junk over the first pieces; whatever is left goes after them.
    let mut quirks = if script.malformed {
        quirks(script)
    } else {
        Vec::new()
    }
    .into_iter();
    for piece in &script.pieces {
        if let Some(quirk) = quirks.next() {
            steps.push(raw(quirk));
        }
        let (delta, content) = match piece {
            Piece::Reasoning(text) => (json!({"reasoning_content": text}), false),
            Piece::Content(text) => (json!({"content": text}), true),
            Piece::ToolArgs { first, text } => (tool_delta(script, *first, text), false),
        };
        let text = sse_data(&chunk(script, delta, None));
        steps.push(Step::Frame {
            delay: script.interval,
            text,
            content,
        });
    }
    steps.extend(quirks.map(raw));
    match &script.ending {
        Ending::Finish(reason) => {
            if script.send_finish_reason {
                steps.push(frame(
                    Duration::ZERO,
                    &chunk(script, json!({}), Some(reason.as_str())),
                ));
            }
            if script.include_usage {
                steps.push(frame(Duration::ZERO, &usage_chunk(script)));
            }
            if script.send_done {
                steps.push(raw("data: [DONE]\n\n".to_owned()));
            }
            steps.push(Step::End(Outcome::Completed));
        }
        Ending::Drop => steps.push(Step::Abort(Outcome::Dropped)),
        Ending::Truncate => steps.push(Step::End(Outcome::Truncated)),
        Ending::Hang => steps.push(Step::Hang),
        Ending::Error(message) => {
            let error = json!({"error": {"message": message, "type": "server_error"}});
            steps.push(frame(Duration::ZERO, &error));
            steps.push(Step::End(Outcome::StreamError));
        }
    }
    steps
}

fn frame(delay: Duration, value: &Value) -> Step {
    Step::Frame {
        delay,
        text: sse_data(value),
        content: false,
    }
}

fn raw(text: String) -> Step {
    Step::Frame {
        delay: Duration::ZERO,
        text,
        content: false,
    }
}

fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// A `chat.completion.chunk` with a single choice.
fn chunk(script: &Script, delta: Value, finish_reason: Option<&str>) -> Value {
    let mut chunk = envelope(script);
    chunk["choices"] =
        json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);
    chunk
}

fn usage_chunk(script: &Script) -> Value {
    let mut chunk = envelope(script);
    chunk["choices"] = json!([]);
    chunk["usage"] = script.usage();
    chunk
}

fn envelope(script: &Script) -> Value {
    json!({
        "id": script.id,
        "object": "chat.completion.chunk",
        "created": script.created,
        "model": script.model,
        "system_fingerprint": script.model,
    })
}

fn tool_delta(script: &Script, first: bool, arguments: &str) -> Value {
    match (&script.tool, first) {
        (Some(tool), true) => json!({"tool_calls": [{
            "index": 0,
            "id": tool.id,
            "type": "function",
            "function": {"name": tool.name, "arguments": arguments},
        }]}),
        _ => json!({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
    }
}

/// Junk seen from real servers, which a tolerant client must skip.
fn quirks(script: &Script) -> Vec<String> {
    let mut null_choices = envelope(script);
    null_choices["choices"] = Value::Null;
    let mut no_choices = envelope(script);
    no_choices["choices"] = json!([]);
    vec![
        "data: {not json\n\n".to_owned(),
        sse_data(&null_choices),
        sse_data(&no_choices),
        ": keep-alive\n\n".to_owned(),
        "event: ping\n\n".to_owned(),
    ]
}
