//! The parts of an OpenAI chat-completion request the simulator acts on.

use serde_json::{Map, Value};

use super::config::parse_directive;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_tokens`, or the newer `max_completion_tokens`.
    pub max_tokens: Option<usize>,
    /// A rough word count of the messages, reported as prompt usage.
    pub prompt_tokens: usize,
    /// Behaviour overrides from a `#sim` directive in the last message.
    pub overrides: Option<Map<String, Value>>,
}

impl ChatRequest {
    /// Validates `body`; the error is a message for a 400 answer.
    pub(crate) fn parse(body: &Value) -> Result<Self, String> {
        let Value::Object(fields) = body else {
            return Err("request body must be a JSON object".to_owned());
        };
        let model = match fields.get("model") {
            Some(Value::String(model)) => model.clone(),
            Some(_) => return Err("'model' must be a string".to_owned()),
            None => return Err("'model' is required".to_owned()),
        };
        let Some(Value::Array(messages)) = fields.get("messages") else {
            return Err("'messages' must be an array".to_owned());
        };
        let last_content = messages
            .last()
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str);
        let overrides = match last_content {
            Some(content) => parse_directive(content)?,
            None => None,
        };
        let max_tokens = ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|key| fields.get(*key).and_then(Value::as_u64))
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Ok(Self {
            model,
            stream: fields.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: body.pointer("/stream_options/include_usage")
                == Some(&Value::Bool(true)),
            max_tokens,
            prompt_tokens: messages.iter().map(word_count).sum(),
            overrides,
        })
    }
}

/// Words in a message's content, whether a string or an array of parts.
fn word_count(message: &Value) -> usize {
    match message.get("content") {
        Some(Value::String(text)) => text.split_whitespace().count(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(|text| text.split_whitespace().count())
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_fields_that_matter() {
        let request = ChatRequest::parse(&json!({
            "model": "m",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 3,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "#sim {\"tokens\": 1} hi"}]}
            ]
        }))
        .unwrap();
        assert_eq!(request.model, "m");
        assert!(request.stream && request.include_usage);
        assert_eq!(request.max_tokens, Some(3));
        assert_eq!(request.prompt_tokens, 6);
        // Only a plain string content carries a directive.
        assert_eq!(request.overrides, None);
    }

    #[test]
    fn rejects_what_an_openai_server_rejects() {
        assert!(ChatRequest::parse(&json!([1])).is_err());
        assert!(ChatRequest::parse(&json!({"messages": []})).is_err());
        assert!(ChatRequest::parse(&json!({"model": 1, "messages": []})).is_err());
        assert!(ChatRequest::parse(&json!({"model": "m"})).is_err());
        let bad_directive =
            json!({"model": "m", "messages": [{"role": "user", "content": "#sim nope"}]});
        assert!(ChatRequest::parse(&bad_directive).is_err());
    }
}
