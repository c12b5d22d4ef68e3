//! The body of `POST /v1/chat/completions`, built from typed parameters.

use serde_json::{Map, Value, json};

use crate::task::ChatParams;

/// Always streaming with usage; optional fields only when set (`repeat_penalty` only when it
/// changes anything, since it is a llama.cpp / LM Studio extension other servers may reject).
pub fn chat_body(model: &str, params: &ChatParams) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(params.messages.clone()));
    body.insert("temperature".into(), json!(params.temperature));
    body.insert("max_tokens".into(), json!(params.max_tokens));
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    if !params.tools.is_empty() {
        let tools = params.tools.iter().map(normalise_tool).collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &params.tool_choice {
        body.insert("tool_choice".into(), choice.clone());
    }
    if let Some(seed) = params.seed {
        body.insert("seed".into(), json!(seed));
    }
    if let Some(penalty) = params.repeat_penalty
        && penalty != 1.0
    {
        body.insert("repeat_penalty".into(), json!(penalty));
    }
    if let Some(format) = &params.response_format {
        body.insert("response_format".into(), format.clone());
    }
    Value::Object(body)
}

/// Flat BFCL-style `{name, description, parameters}` tools become OpenAI function tools;
/// tools already in OpenAI shape pass unchanged.
pub fn normalise_tool(tool: &Value) -> Value {
    match tool.as_object() {
        Some(t) if t.contains_key("function") => tool.clone(),
        Some(t) if t.contains_key("name") => json!({"type": "function", "function": tool}),
        _ => tool.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChatParams {
        ChatParams {
            messages: vec![json!({"role":"user","content":[{"type":"text","text":"hi"}]})],
            temperature: 0.0,
            max_tokens: 10,
            tools: vec![],
            tool_choice: None,
            seed: None,
            repeat_penalty: None,
            response_format: None,
        }
    }

    #[test]
    fn minimal_body_streams_with_usage() {
        let b = chat_body("m", &params());
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(
            b["messages"][0]["content"][0]["text"], "hi",
            "messages verbatim"
        );
        for absent in [
            "tools",
            "tool_choice",
            "seed",
            "repeat_penalty",
            "response_format",
        ] {
            assert!(b.get(absent).is_none(), "{absent} must be absent");
        }
    }

    #[test]
    fn optional_fields_and_tool_normalisation() {
        let mut p = params();
        p.tools = vec![
            json!({"name":"get_weather","description":"d","parameters":{"type":"object"}}),
            json!({"type":"function","function":{"name":"ls"}}),
        ];
        p.tool_choice = Some(json!("required"));
        p.seed = Some(42);
        p.repeat_penalty = Some(1.1);
        p.response_format = Some(json!({"type":"json_object"}));
        let b = chat_body("m", &p);
        assert_eq!(b["tools"][0]["type"], "function");
        assert_eq!(b["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(b["tools"][1]["function"]["name"], "ls");
        assert_eq!(b["tool_choice"], "required");
        assert_eq!(b["seed"], 42);
        assert_eq!(b["repeat_penalty"], 1.1);
        assert_eq!(b["response_format"]["type"], "json_object");

        p.repeat_penalty = Some(1.0);
        assert!(
            chat_body("m", &p).get("repeat_penalty").is_none(),
            "1.0 is not sent"
        );
    }
}
