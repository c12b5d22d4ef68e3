//! What a simulated model generates for one request, decided up front so the
//! streaming and the non-streaming answers tell the same story.

use std::time::Duration;

use serde_json::{Value, json};

use super::config::Behaviour;
use super::request::ChatRequest;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Reasoning(String),
    Content(String),
    /// A fragment of the tool call's arguments; the first delta also names
    /// the call.
    ToolArgs {
        first: bool,
        text: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

impl FinishReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// How the answer ends after its pieces.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    Finish(FinishReason),
    /// Abort the body (`drop_after_tokens`).
    Drop,
    /// End the body cleanly, unfinished (`end_after_tokens`).
    Truncate,
    /// Go silent with the connection open (`hang_after_tokens`).
    Hang,
    /// Report an error in-band (`in_stream_error`).
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolHeader {
    pub id: String,
    pub name: String,
}

/// One answer: identity, generated pieces, ending, and delivery quirks.
#[derive(Debug, Clone)]
pub(crate) struct Script {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub pieces: Vec<Piece>,
    pub ending: Ending,
    pub tool: Option<ToolHeader>,
    /// Wait before each piece.
    pub interval: Duration,
    pub prompt_tokens: usize,
    pub include_usage: bool,
    pub send_done: bool,
    pub send_finish_reason: bool,
    pub malformed: bool,
    pub garbage_line_bytes: usize,
}

impl Script {
    pub(crate) fn plan(
        behaviour: &Behaviour,
        request: &ChatRequest,
        seq: u64,
        created: u64,
    ) -> Self {
        // max_tokens bounds reasoning plus content; tool-call fragments are
        // not counted, but a length cut-off leaves the call out entirely.
        let budget = match request.max_tokens {
            Some(max) if !behaviour.ignore_max_tokens => max,
            _ => usize::MAX,
        };
        let reasoning = behaviour.reasoning_tokens.min(budget);
        let content = behaviour.tokens.min(budget - reasoning);
        let hit_length = reasoning + content < behaviour.reasoning_tokens + behaviour.tokens;

        let cut = [
            (behaviour.drop_after_tokens, Ending::Drop),
            (behaviour.end_after_tokens, Ending::Truncate),
            (behaviour.hang_after_tokens, Ending::Hang),
        ]
        .into_iter()
        .find_map(|(after, ending)| after.map(|n| (n, ending)));

        let content_before_end = cut.as_ref().map_or(content, |(n, _)| content.min(*n));
        let mut pieces: Vec<Piece> = (0..reasoning)
            .map(|i| Piece::Reasoning(format!("think{i} ")))
            .chain(
                (0..content_before_end)
                    .map(|i| Piece::Content(format!("{}{i} ", behaviour.token_text))),
            )
            .collect();

        let tool_spec = behaviour
            .tool_call
            .as_ref()
            .filter(|_| cut.is_none() && !hit_length);
        let tool = tool_spec.map(|spec| {
            let fragments = split_even(&spec.arguments, spec.fragments);
            pieces.extend(
                fragments
                    .into_iter()
                    .enumerate()
                    .map(|(i, text)| Piece::ToolArgs {
                        first: i == 0,
                        text,
                    }),
            );
            ToolHeader {
                id: format!("call_sim_{seq}"),
                name: spec.name.clone(),
            }
        });

        let ending = match (cut, &behaviour.in_stream_error) {
            (Some((_, ending)), _) => ending,
            (None, Some(message)) => Ending::Error(message.clone()),
            (None, None) if hit_length => Ending::Finish(FinishReason::Length),
            (None, None) if tool.is_some() => Ending::Finish(FinishReason::ToolCalls),
            (None, None) => Ending::Finish(FinishReason::Stop),
        };

        Self {
            id: format!("chatcmpl-sim-{seq}"),
            created,
            model: request.model.clone(),
            pieces,
            ending,
            tool,
            interval: Duration::from_millis(behaviour.token_interval_ms),
            prompt_tokens: request.prompt_tokens,
            include_usage: request.include_usage,
            send_done: behaviour.send_done,
            send_finish_reason: behaviour.send_finish_reason,
            malformed: behaviour.malformed,
            garbage_line_bytes: behaviour.garbage_line_bytes,
        }
    }

    pub(crate) fn content_tokens(&self) -> usize {
        self.pieces
            .iter()
            .filter(|p| matches!(p, Piece::Content(_)))
            .count()
    }

    /// Every piece counts as one generated token.
    pub(crate) fn completion_tokens(&self) -> usize {
        self.pieces.len()
    }

    /// The OpenAI `usage` object.
    pub(crate) fn usage(&self) -> Value {
        let completion = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// Time spent generating all pieces.
    pub(crate) fn generation_time(&self) -> Duration {
        let pieces = u32::try_from(self.pieces.len()).unwrap_or(u32::MAX);
        self.interval.saturating_mul(pieces)
    }
}

/// Splits `text` into `parts` pieces of near-equal length (in characters, so
/// multi-byte text stays valid). Never returns more pieces than characters,
/// but always at least one.
fn split_even(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let parts = parts.clamp(1, chars.len().max(1));
    (0..parts)
        .map(|i| {
            chars[i * chars.len() / parts..(i + 1) * chars.len() / parts]
                .iter()
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::config::ToolCallSpec;

    fn request(max_tokens: Option<usize>) -> ChatRequest {
        ChatRequest {
            model: "m".to_owned(),
            stream: true,
            include_usage: false,
            max_tokens,
            prompt_tokens: 1,
            overrides: None,
        }
    }

    fn texts(script: &Script) -> Vec<String> {
        script
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Reasoning(t) | Piece::Content(t) | Piece::ToolArgs { text: t, .. } => {
                    t.clone()
                }
            })
            .collect()
    }

    #[test]
    fn reasoning_then_content_then_tool_call() {
        let behaviour = Behaviour {
            tokens: 2,
            reasoning_tokens: 1,
            tool_call: Some(ToolCallSpec {
                name: "f".to_owned(),
                arguments: "{\"a\":1}".to_owned(),
                fragments: 3,
            }),
            ..Behaviour::default()
        };
        let script = Script::plan(&behaviour, &request(None), 7, 0);
        assert_eq!(
            texts(&script),
            ["think0 ", "tok0 ", "tok1 ", "{\"", "a\"", ":1}"]
        );
        assert_eq!(script.ending, Ending::Finish(FinishReason::ToolCalls));
        assert_eq!(
            script.tool.as_ref().map(|t| t.id.as_str()),
            Some("call_sim_7")
        );
        assert_eq!(script.content_tokens(), 2);
        assert_eq!(script.completion_tokens(), 6);
    }

    #[test]
    fn max_tokens_cuts_with_length_and_drops_the_tool_call() {
        let behaviour = Behaviour {
            tokens: 5,
            tool_call: Some(ToolCallSpec::default()),
            ..Behaviour::default()
        };
        let script = Script::plan(&behaviour, &request(Some(3)), 1, 0);
        assert_eq!(script.content_tokens(), 3);
        assert_eq!(script.tool, None);
        assert_eq!(script.ending, Ending::Finish(FinishReason::Length));
        let exact = Script::plan(&Behaviour::default(), &request(Some(5)), 1, 0);
        assert_eq!(exact.ending, Ending::Finish(FinishReason::Stop));
    }

    #[test]
    fn cut_offs_apply_after_the_content_they_name() {
        let behaviour = Behaviour {
            drop_after_tokens: Some(2),
            end_after_tokens: Some(1),
            in_stream_error: Some("boom".to_owned()),
            ..Behaviour::default()
        };
        let script = Script::plan(&behaviour, &request(None), 1, 0);
        assert_eq!(script.content_tokens(), 2);
        assert_eq!(script.ending, Ending::Drop);
        let beyond = Behaviour {
            hang_after_tokens: Some(50),
            ..Behaviour::default()
        };
        let script = Script::plan(&beyond, &request(None), 1, 0);
        assert_eq!(script.content_tokens(), 5);
        assert_eq!(script.ending, Ending::Hang);
    }

    #[test]
    fn split_even_keeps_characters_whole() {
        assert_eq!(split_even("abcdef", 4), ["a", "bc", "d", "ef"]);
        assert_eq!(split_even("é€", 5), ["é", "€"]);
        assert_eq!(split_even("", 3), [""]);
        assert_eq!(split_even("xy", 0), ["xy"]);
    }
}
