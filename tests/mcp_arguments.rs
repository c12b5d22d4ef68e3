//! MCP parameters as real clients send them, over MCP itself (Streamable HTTP, rmcp's client):
//! the schema every client sees, the exact values Claude Code, Claude Desktop and Warp send,
//! what reaches the host, and the text content of answers that hold no text.

mod common;

use common::{Fleet, HttpFront, host};
use prix_dispatch::sim::sim_directive;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Map, Value, json};

struct Session {
    fleet: Fleet,
    front: HttpFront,
    client: RunningService<RoleClient, ()>,
}

async fn session() -> Session {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let client = ()
        .serve(rmcp::transport::StreamableHttpClientTransport::from_uri(
            format!("{}/mcp", front.base),
        ))
        .await
        .unwrap();
    Session {
        fleet,
        front,
        client,
    }
}

impl Session {
    /// `complete` with a one-message request plus `extra` arguments, exactly as given.
    async fn complete(&self, content: &str, extra: Value) -> CallToolResult {
        let mut args: Map<String, Value> = json!({
            "model_id": "m",
            "messages": [{"role": "user", "content": content}],
        })
        .as_object()
        .unwrap()
        .clone();
        args.extend(extra.as_object().unwrap().clone());
        self.client
            .call_tool(CallToolRequestParams::new("complete").with_arguments(args))
            .await
            .expect("an argument error is a tool result, not a protocol error")
    }

    /// The body the host received for its last chat request.
    fn last_body(&self) -> Value {
        self.fleet.chat_records(0).last().unwrap().body.clone()
    }

    async fn close(self) {
        self.client.cancel().await.unwrap();
        drop(self.front);
        self.fleet.shutdown().await;
    }
}

/// A refused argument: a tool error with kind invalid_request, not retryable, naming `param`.
fn assert_refused(result: &CallToolResult, param: &str) -> String {
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let data = result.structured_content.as_ref().unwrap();
    assert_eq!(data["kind"], "invalid_request", "{data}");
    assert_eq!(data["retryable"], false, "{data}");
    let message = data["message"].as_str().unwrap().to_string();
    assert!(message.contains(param), "{message}");
    message
}

#[tokio::test]
async fn the_schema_types_every_parameter_without_null() {
    let s = session().await;
    let tools = s.client.list_all_tools().await.unwrap();
    let complete = tools.iter().find(|t| t.name == "complete").unwrap();
    let props = complete.input_schema["properties"].as_object().unwrap();
    for (name, schema) in props {
        assert!(
            schema.get("type").is_some(),
            "{name} has no type, so Claude Code would send it as a string: {schema}"
        );
        let text = schema.to_string();
        assert!(
            !text.contains("\"null\"") && schema.get("anyOf").is_none(),
            "{name} advertises null: {schema}"
        );
    }
    assert_eq!(props["response_format"]["type"], "object");
    assert_eq!(props["tool_choice"]["type"], json!(["string", "object"]));
    assert_eq!(props["tools"]["type"], "array");
    assert_eq!(props["tools"]["items"]["type"], "object");
    assert_eq!(props["messages"]["items"]["type"], "object");
    assert_eq!(props["max_tokens"]["type"], "integer");
    assert_eq!(props["seed"]["type"], "integer");
    assert_eq!(props["timeout_seconds"]["type"], "number");
    assert_eq!(props["api_key"]["type"], "string");
    let required = complete.input_schema["required"].as_array().unwrap();
    assert_eq!(required, &[json!("model_id"), json!("messages")]);
    s.close().await;
}

/// Claude Code: a parameter it sees without a type goes as a JSON string.
#[tokio::test]
async fn json_in_a_string_is_parsed_never_forwarded_as_a_string() {
    let s = session().await;
    let r = s
        .complete(
            "hi",
            json!({
                "response_format": "{\"type\":\"json_object\"}",
                "tool_choice": "{\"type\":\"function\",\"function\":{\"name\":\"f\"}}",
                "tools": "[{\"name\":\"f\",\"description\":\"d\",\"parameters\":{\"type\":\"object\"}}]",
            }),
        )
        .await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let body = s.last_body();
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    assert_eq!(body["tool_choice"]["function"]["name"], "f");
    assert_eq!(body["tools"][0]["function"]["name"], "f");
    // A plain string tool_choice stays a string.
    let r = s.complete("hi", json!({"tool_choice": "auto"})).await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    assert_eq!(s.last_body()["tool_choice"], "auto");
    // Anything else is refused by name, and nothing reaches the host.
    let before = s.fleet.chat_records(0).len();
    assert_refused(
        &s.complete("hi", json!({"response_format": "json_object"}))
            .await,
        "response_format",
    );
    assert_refused(
        &s.complete("hi", json!({"response_format": "[1]"})).await,
        "response_format",
    );
    assert_refused(&s.complete("hi", json!({"tools": [1]})).await, "tools");
    assert_refused(
        &s.complete("hi", json!({"tool_choice": 3})).await,
        "tool_choice",
    );
    assert_eq!(s.fleet.chat_records(0).len(), before);
    s.close().await;
}

/// Claude Desktop: values of untyped parameters arrive as strings.
#[tokio::test]
async fn a_value_of_the_wrong_type_is_refused_by_name() {
    let s = session().await;
    let m = assert_refused(
        &s.complete("hi", json!({"max_tokens": "50"})).await,
        "max_tokens",
    );
    assert!(m.contains("\"50\"") && m.contains("an integer"), "{m}");
    let m = assert_refused(
        &s.complete("hi", json!({"temperature": "0.2"})).await,
        "temperature",
    );
    assert!(m.contains("a number"), "{m}");
    assert_refused(&s.complete("hi", json!({"seed": "7"})).await, "seed");
    assert_refused(
        &s.complete("hi", json!({"timeout_seconds": "30"})).await,
        "timeout_seconds",
    );
    // A missing required parameter and a message that is not an object.
    let args = json!({"messages": [{"role": "user", "content": "hi"}]});
    let r = s
        .client
        .call_tool(
            CallToolRequestParams::new("complete")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_refused(&r, "model_id");
    let args = json!({"model_id": "m", "messages": ["hi"]});
    let r = s
        .client
        .call_tool(
            CallToolRequestParams::new("complete")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_refused(&r, "messages");
    // null is "not given".
    let r = s
        .complete("hi", json!({"seed": null, "max_tokens": 7}))
        .await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    assert!(s.last_body().get("seed").is_none());
    s.close().await;
}

/// Warp: whole-number floats for integers.
#[tokio::test]
async fn whole_number_floats_are_integers() {
    let s = session().await;
    let r = s
        .complete("hi", json!({"max_tokens": 50.0, "seed": 42.0}))
        .await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let body = s.last_body();
    assert_eq!(body["max_tokens"], json!(50));
    assert_eq!(body["seed"], json!(42));
    let m = assert_refused(
        &s.complete("hi", json!({"max_tokens": 50.5})).await,
        "max_tokens",
    );
    assert!(m.contains("50.5"), "{m}");
    assert_refused(&s.complete("hi", json!({"seed": 1e30})).await, "seed");
    s.close().await;
}

#[tokio::test]
async fn an_answer_without_text_still_has_text_content() {
    let s = session().await;
    let tool_only = sim_directive(json!({"tokens": 0,
        "tool_call": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}", "fragments": 2}}));
    let r = s.complete(&tool_only, json!({})).await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let text = r.content[0].as_text().unwrap().text.clone();
    let parsed: Value = serde_json::from_str(&text).expect("the structured result as JSON");
    assert_eq!(&parsed, r.structured_content.as_ref().unwrap());
    assert_eq!(parsed["tool_calls"][0]["name"], "get_weather");

    let reasoning_only = sim_directive(json!({"tokens": 3, "reasoning_tokens": 4}));
    let r = s.complete(&reasoning_only, json!({"max_tokens": 4})).await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let text = &r.content[0].as_text().unwrap().text;
    assert!(
        text.contains("only reasoning") && text.contains("max_tokens") && text.contains("think0"),
        "{text}"
    );

    let empty = sim_directive(json!({"tokens": 0}));
    let r = s.complete(&empty, json!({})).await;
    let text = &r.content[0].as_text().unwrap().text;
    assert!(text.contains("empty answer"), "{text}");
    s.close().await;
}
