//! Errors keep their class: a host's 4xx reaches OpenAI clients as that 4xx in OpenAI's error
//! shape with the host's whole message, `x-should-retry` says whether to retry, and MCP gets
//! the same message, not retryable. Replayed with the exact bodies real servers send.

mod common;

use common::{Fleet, HttpFront, host, spec};
use prix_dispatch::ErrorKind;
use prix_dispatch::sim::sim_directive;
use serde_json::{Value, json};

/// vLLM's answer to a prompt over the model's context (its `ErrorResponse`, top level).
fn vllm_context_error() -> Value {
    json!({"object": "error",
        "message": "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (1900 in the messages, 200 in the completion). Please reduce the length of the messages or completion.",
        "type": "BadRequestError", "param": null, "code": 400})
}

fn replay(status: u16, content_type: &str, body: &str) -> String {
    sim_directive(
        json!({"raw": {"status": status, "content_type": content_type, "chunks": [body]}}),
    )
}

async fn post(base: &str, content: &str, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "m", "stream": stream,
            "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn host_4xx_of_every_shape_passes_through_whole_and_not_retryable() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let vllm = vllm_context_error();
    let long = vllm["message"].as_str().unwrap().to_string();
    let cases = [
        (vllm.to_string(), long.clone()),
        // llama.cpp
        (
            json!({"error": {"code": 400, "message": "the request exceeds the available context size", "type": "exceed_context_size_error"}}).to_string(),
            "the request exceeds the available context size".to_string(),
        ),
        // LM Studio
        (
            json!({"error": {"message": "Trying to keep the first 5000 tokens when context the overflows. However, the model is loaded with context length of only 4096 tokens", "type": "invalid_request_error", "param": null, "code": null}}).to_string(),
            "However, the model is loaded with context length of only 4096 tokens".to_string(),
        ),
        // Ollama
        (
            json!({"error": "model requires more system memory than is available"}).to_string(),
            "model requires more system memory than is available".to_string(),
        ),
    ];
    for (body, message) in &cases {
        for stream in [true, false] {
            let r = post(&front.base, &replay(400, "application/json", body), stream).await;
            assert_eq!(r.status(), 400, "{body}");
            assert_eq!(r.headers()["x-should-retry"], "false");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["type"], "invalid_request_error");
            let text = e["error"]["message"].as_str().unwrap();
            assert!(
                text.contains(message.as_str()) && text.contains("gpu0"),
                "{text}"
            );
            assert!(
                !text.contains("{\""),
                "the host's words, not its JSON: {text}"
            );
        }
    }
    // The typed (MCP) path: the same whole message, not retryable.
    let e = fleet
        .dispatcher
        .run(
            spec(
                "m",
                &replay(400, "application/json", &vllm.to_string()),
                json!({}),
            ),
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::HostError);
    assert!(!e.retryable);
    assert!(e.message.contains(&long), "{e}");
    drop(front);
    fleet.shutdown().await;
}

/// Older llama.cpp builds answer a prompt over the context with HTTP 500 and
/// `"type": "exceed_context_size_error"` (ggml-org/llama.cpp#15780): the request's fault.
#[tokio::test]
async fn llama_cpp_context_overflow_as_500_is_a_400() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let body = json!({"error": {"code": 500, "message": "the request exceeds the available context size. try increasing the context size or enable context shift", "type": "exceed_context_size_error", "n_prompt_tokens": 1407, "n_ctx": 256}}).to_string();
    let r = post(&front.base, &replay(500, "application/json", &body), true).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let e = fleet
        .dispatcher
        .run(
            spec("m", &replay(500, "application/json", &body), json!({})),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(!e.retryable, "{e}");
    assert!(
        e.message.contains("exceeds the available context size"),
        "{e}"
    );
    // The host is not unhealthy for it: still up, no error recorded against it.
    let status = fleet.status().await;
    assert!(status.hosts[0].reachable, "{status:#?}");
    assert_eq!(status.hosts[0].state.last_error, None, "{status:#?}");
    assert_eq!(
        status.hosts[0].state.health,
        prix_dispatch::scheduler::state::Health::Up
    );
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn retryable_failures_say_so_and_permanent_ones_behind_5xx_say_not() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let r = post(
        &front.base,
        &sim_directive(json!({"fail_status": 503, "fail_message": "loading model"})),
        false,
    )
    .await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-should-retry"], "true");
    let r = post(
        &front.base,
        &sim_directive(json!({"fail_status": 429, "fail_message": "busy"})),
        false,
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "true");
    // Unknown model: the daemon's own 404, not retryable.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", front.base))
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-should-retry"], "false");
    drop(front);
    fleet.shutdown().await;
}

/// LM Studio's answer to a path it does not serve, even to a `stream: true` request: HTTP 200,
/// `Content-Type: application/json`, no trailing newline.
#[tokio::test]
async fn lm_studio_200_json_error_on_a_stream_is_an_error_status() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let body = r#"{"error":"Unexpected endpoint or method. (POST /chat/completions)"}"#;
    for stream in [true, false] {
        let r = post(&front.base, &replay(200, "application/json", body), stream).await;
        assert_eq!(r.status(), 502, "stream {stream}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        let e: Value = r.json().await.unwrap();
        let text = e["error"]["message"].as_str().unwrap();
        assert!(
            text.contains("Unexpected endpoint or method") && text.contains("url"),
            "{text}"
        );
    }
    let e = fleet
        .dispatcher
        .run(
            spec("m", &replay(200, "application/json", body), json!({})),
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Protocol);
    assert!(!e.retryable, "a wrong URL stays wrong: {e}");
    drop(front);
    fleet.shutdown().await;
}

/// A stream cut in the middle of a line: the half line is not relayed, and the daemon's error
/// event is an event of its own that parses.
#[tokio::test]
async fn an_error_event_never_lands_inside_a_host_line() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n";
    let cut = sim_directive(
        json!({"raw": {"chunks": [first, "data: {\"choices\":[{\"in"], "abort": true}}),
    );
    let r = post(&front.base, &cut, true).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.starts_with(first), "{body}");
    let rest = &body[first.len()..];
    assert!(
        !rest.contains("choices"),
        "the cut line is held back: {body}"
    );
    let payload = rest.trim().strip_prefix("data: ").unwrap();
    let e: Value = serde_json::from_str(payload).unwrap();
    assert_eq!(e["error"]["code"], "stream_truncated", "{body}");
    drop(front);
    fleet.shutdown().await;
}

/// A 200 whose body is not an event stream (a proxy's error page): still a failure, and the
/// message quotes what the host sent.
#[tokio::test]
async fn a_200_that_is_no_event_stream_is_quoted() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let page = "<html><body>502 Bad Gateway (upstream down)</body></html>";
    let e = fleet
        .dispatcher
        .run(
            spec("m", &replay(200, "text/html", page), json!({})),
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamAborted);
    assert!(
        e.message.contains("upstream down") && e.message.contains("not an event stream"),
        "{e}"
    );
    fleet.shutdown().await;
}
