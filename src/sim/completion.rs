//! The non-streaming answer: the whole script as one `chat.completion`,
//! delivered after the time the stream would have taken.

use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::record::Outcome;
use super::reply::{aborted, error_body, finish_json};
use super::script::{Ending, Piece, Script};
use super::state::{RecordGuard, wait_evicted};

pub(crate) async fn respond(
    mut guard: RecordGuard,
    script: &Script,
    mut evicted: watch::Receiver<bool>,
) -> Response {
    let evicted_meanwhile = tokio::select! {
        () = tokio::time::sleep(script.generation_time()) => false,
        () = wait_evicted(&mut evicted) => true,
    };
    if evicted_meanwhile {
        return aborted(guard, Outcome::Evicted);
    }
    match &script.ending {
        Ending::Finish(_) => {
            let tokens = script.content_tokens();
            guard.update(|record| record.tokens_sent = tokens);
            finish_json(guard, StatusCode::OK, body(script))
        }
        Ending::Drop => aborted(guard, Outcome::Dropped),
        Ending::Truncate => {
            // Half a JSON document, ended cleanly: a truncated answer.
            let text = body(script).to_string();
            let half = (0..=text.len() / 2)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            let truncated = text[..half].to_owned();
            guard.first_byte();
            guard.finish(Outcome::Truncated);
            ([(CONTENT_TYPE, "application/json")], truncated).into_response()
        }
        Ending::Hang => {
            wait_evicted(&mut evicted).await;
            aborted(guard, Outcome::Evicted)
        }
        Ending::Error(message) => {
            let body = error_body(message, "server_error", None);
            finish_json(guard, StatusCode::INTERNAL_SERVER_ERROR, body)
        }
    }
}

fn body(script: &Script) -> Value {
    let (mut reasoning, mut content, mut arguments) = (String::new(), String::new(), String::new());
    for piece in &script.pieces {
        match piece {
            Piece::Reasoning(text) => reasoning.push_str(text),
            Piece::Content(text) => content.push_str(text),
            Piece::ToolArgs { text, .. } => arguments.push_str(text),
        }
    }
    let mut message = json!({"role": "assistant", "content": content});
    if content.is_empty() && script.tool.is_some() {
        message["content"] = Value::Null;
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if let Some(tool) = &script.tool {
        message["tool_calls"] = json!([{
            "id": tool.id,
            "type": "function",
            "function": {"name": tool.name, "arguments": arguments},
        }]);
    }
    let finish_reason = match script.ending {
        Ending::Finish(reason) if script.send_finish_reason => json!(reason.as_str()),
        _ => Value::Null,
    };
    json!({
        "id": script.id,
        "object": "chat.completion",
        "created": script.created,
        "model": script.model,
        "system_fingerprint": script.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": script.usage(),
    })
}
