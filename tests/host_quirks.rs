//! An answer is a success only when the host says it is complete: real servers' exact bytes,
//! replayed by the simulated host (`raw` replies), on the typed path (what MCP runs), over MCP
//! itself, and through the OpenAI front door.
//!
//! - llama.cpp: an error as an SSE `error:` field inside an HTTP 200 stream, then `[DONE]`;
//! - Ollama: parallel tool calls, each whole in its own chunk, all at `"index": 0`;
//! - servers that put `"finish_reason": ""` on every chunk, cut mid-answer;
//! - Ollama: `GET /v1/models` answering `{"object":"list","data":null}`.

mod common;

use common::{Fleet, HttpFront, host, spec};
use prix_dispatch::sim::sim_directive;
use prix_dispatch::{CompletionResult, DispatchError, ErrorKind};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use serde_json::{Value, json};

/// llama.cpp's answer to a prompt over its context size (tools/server, `send_error`).
const LLAMA_CONTEXT_ERROR: &str = "error: {\"code\":400,\"message\":\"the request exceeds the available context size. try increasing the context size or enable context shift\",\"type\":\"invalid_request_error\"}\n\n";

fn chunk(delta: Value, finish: Value) -> String {
    let chunk = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

/// A directive that makes the host replay `chunks` (each its own write).
fn raw(chunks: &[String], abort: bool) -> String {
    sim_directive(json!({"raw": {"chunks": chunks, "abort": abort, "interval_ms": 5}}))
}

/// Tokens, then llama.cpp's error field, then `[DONE]`.
fn tokens_then_llama_error() -> Vec<String> {
    vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hel"}), Value::Null),
        LLAMA_CONTEXT_ERROR.to_string(),
        "data: [DONE]\n\n".to_string(),
    ]
}

/// Ollama's two parallel calls (ollama/ollama#15457): whole, one per chunk, both at index 0.
fn ollama_parallel_calls() -> Vec<String> {
    let call = |id: &str, file: &str| {
        chunk(
            json!({"role": "assistant", "content": "", "tool_calls": [{
                "id": id, "index": 0, "type": "function",
                "function": {"name": "read", "arguments": json!({"filePath": file}).to_string()},
            }]}),
            Value::Null,
        )
    };
    vec![
        call("call_a1", "hello.py"),
        call("call_b2", "world.py"),
        chunk(
            json!({"role": "assistant", "content": ""}),
            json!("tool_calls"),
        ),
        "data: [DONE]\n\n".to_string(),
    ]
}

/// Content chunks that all say `"finish_reason": ""`, and no final chunk, no `[DONE]`.
fn empty_finish_reasons_then_cut() -> Vec<String> {
    vec![
        chunk(json!({"role": "assistant", "content": "Hel"}), json!("")),
        chunk(json!({"content": "lo"}), json!("")),
    ]
}

async fn typed(content: &str) -> (Result<CompletionResult, DispatchError>, Fleet) {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let result = fleet
        .dispatcher
        .run(spec("m", content, json!({})), |_| {})
        .await;
    (result, fleet)
}

/// One `complete` call over MCP (Streamable HTTP, rmcp's client).
async fn mcp_call(base: &str, content: &str) -> CallToolResult {
    use rmcp::ServiceExt;
    let client = ()
        .serve(rmcp::transport::StreamableHttpClientTransport::from_uri(
            format!("{base}/mcp"),
        ))
        .await
        .unwrap();
    let args = json!({"model_id": "m", "messages": [{"role": "user", "content": content}]});
    let result = client
        .call_tool(
            CallToolRequestParams::new("complete")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    client.cancel().await.unwrap();
    result
}

async fn openai_call(base: &str, content: &str, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "m", "stream": stream,
            "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, as the `openai` SDK reads them (blank-line events).
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn assert_context_error(e: &DispatchError) {
    assert_eq!(e.kind, ErrorKind::StreamError, "{e}");
    assert!(
        !e.retryable,
        "a prompt over the context size fails again: {e}"
    );
    assert!(
        e.message.contains("at gpu0")
            && e.message
                .contains("the request exceeds the available context size"),
        "{e}"
    );
}

#[tokio::test]
async fn llama_cpp_error_field_fails_the_task_not_an_empty_success() {
    let (r, fleet) = typed(&raw(
        &[LLAMA_CONTEXT_ERROR.into(), "data: [DONE]\n\n".into()],
        false,
    ))
    .await;
    assert_context_error(&r.unwrap_err());
    fleet.shutdown().await;
    // Tokens came first: the half answer is not a success either.
    let (r, fleet) = typed(&raw(&tokens_then_llama_error(), false)).await;
    assert_context_error(&r.unwrap_err());
    fleet.shutdown().await;
}

#[tokio::test]
async fn llama_cpp_error_field_over_mcp_is_a_tool_error() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let result = mcp_call(&front.base, &raw(&tokens_then_llama_error(), false)).await;
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let data = result.structured_content.unwrap();
    assert_eq!(data["kind"], "stream_error");
    assert_eq!(data["retryable"], false);
    assert_eq!(data["host_status"], 400);
    let text = data["message"].as_str().unwrap();
    assert!(
        text.contains("gpu0") && text.contains("exceeds the available context size"),
        "{text}"
    );
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn llama_cpp_error_field_over_openai_is_a_400_or_an_error_event() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    // Before any token: nothing was relayed yet, so the client gets the host's 400.
    let only_error = raw(
        &[LLAMA_CONTEXT_ERROR.into(), "data: [DONE]\n\n".into()],
        false,
    );
    for stream in [true, false] {
        let r = openai_call(&front.base, &only_error, stream).await;
        assert_eq!(r.status(), 400, "stream {stream}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("exceeds the available context size"),
            "{message}"
        );
    }
    // After a token: the stream carries it, then the daemon's error event, and no [DONE]
    // (which would make the client stop reading before the error).
    let r = openai_call(&front.base, &raw(&tokens_then_llama_error(), false), true).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let payloads = sse_payloads(&body);
    assert!(!payloads.iter().any(|p| p == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["retryable"], false, "{body}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeds the available context size"),
        "{body}"
    );
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn ollama_parallel_calls_at_one_index_are_two_calls() {
    let (r, fleet) = typed(&raw(&ollama_parallel_calls(), false)).await;
    let r = r.unwrap();
    let calls: Vec<(Option<&str>, &str)> = r
        .tool_calls
        .iter()
        .map(|c| (c.id.as_deref(), c.arguments.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            (Some("call_a1"), r#"{"filePath":"hello.py"}"#),
            (Some("call_b2"), r#"{"filePath":"world.py"}"#),
        ]
    );
    assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
    fleet.shutdown().await;

    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let result = mcp_call(&front.base, &raw(&ollama_parallel_calls(), false)).await;
    assert_eq!(result.is_error, Some(false), "{result:?}");
    let calls = &result.structured_content.unwrap()["tool_calls"];
    assert_eq!(calls.as_array().unwrap().len(), 2, "{calls}");
    for (call, file) in calls
        .as_array()
        .unwrap()
        .iter()
        .zip(["hello.py", "world.py"])
    {
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["filePath"], file);
    }
    drop(front);
    fleet.shutdown().await;
}

/// Each of `chunks` cut in three writes, mid-line: how a host's events reach the daemon when
/// TCP splits them.
fn cut_in_three(chunks: &[String]) -> Vec<String> {
    chunks
        .iter()
        .flat_map(|c| {
            let (a, b) = (c.len() / 3, 2 * c.len() / 3);
            [c[..a].to_string(), c[a..b].to_string(), c[b..].to_string()]
        })
        .collect()
}

/// An OpenAI client accumulates tool calls by index, so the relay renumbers the second call,
/// whether the host's events arrive whole or cut mid-line across reads.
#[tokio::test]
async fn ollama_parallel_calls_reach_openai_clients_as_two_indices() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    for chunks in [
        ollama_parallel_calls(),
        cut_in_three(&ollama_parallel_calls()),
    ] {
        two_indices(&front.base, &chunks).await;
    }
    drop(front);
    fleet.shutdown().await;
}

async fn two_indices(base: &str, chunks: &[String]) {
    let r = openai_call(base, &raw(chunks, false), true).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let mut calls: std::collections::BTreeMap<u64, (String, String)> = Default::default();
    for payload in sse_payloads(&body) {
        if payload == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&payload).unwrap();
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let entry = calls.entry(call["index"].as_u64().unwrap()).or_default();
            if let Some(id) = call["id"].as_str() {
                entry.0 = id.to_string();
            }
            entry.1 += call["function"]["arguments"].as_str().unwrap_or("");
        }
    }
    let calls: Vec<(u64, &str, &str)> = calls
        .iter()
        .map(|(i, (id, args))| (*i, id.as_str(), args.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            (0, "call_a1", r#"{"filePath":"hello.py"}"#),
            (1, "call_b2", r#"{"filePath":"world.py"}"#),
        ],
        "{body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
}

#[tokio::test]
async fn a_cut_stream_with_empty_finish_reasons_is_truncated() {
    for abort in [false, true] {
        let (r, fleet) = typed(&raw(&empty_finish_reasons_then_cut(), abort)).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::StreamTruncated, "abort {abort}: {e}");
        assert!(
            e.message.starts_with("Stream truncated for m at gpu0"),
            "{e}"
        );
        fleet.shutdown().await;
    }
    // The same stream with `null` reasons, for comparison: the same error.
    let nulls = vec![
        chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null),
        chunk(json!({"content": "lo"}), Value::Null),
    ];
    let (r, fleet) = typed(&raw(&nulls, false)).await;
    assert_eq!(r.unwrap_err().kind, ErrorKind::StreamTruncated);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_cut_stream_with_empty_finish_reasons_over_mcp_and_openai() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let cut = raw(&empty_finish_reasons_then_cut(), false);
    let result = mcp_call(&front.base, &cut).await;
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let data = result.structured_content.unwrap();
    assert_eq!(data["kind"], "stream_truncated");
    assert!(
        data["message"]
            .as_str()
            .unwrap()
            .starts_with("Stream truncated")
    );

    let r = openai_call(&front.base, &cut, true).await;
    assert_eq!(r.status(), 200, "tokens were relayed before the cut");
    let body = r.text().await.unwrap();
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.len(), 3, "two chunks, then the error: {body}");
    let last: Value = serde_json::from_str(&payloads[2]).unwrap();
    assert_eq!(last["error"]["code"], "stream_truncated", "{body}");
    drop(front);
    fleet.shutdown().await;
}

/// vLLM ends a request its engine aborted with `finish_reason: "abort"` and then `[DONE]`
/// (vllm-project/vllm#57082): a cut answer, on both paths.
#[tokio::test]
async fn vllm_abort_finish_reason_is_a_truncated_stream() {
    let aborted = vec![
        chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null),
        chunk(json!({}), json!("abort")),
        "data: [DONE]\n\n".to_string(),
    ];
    let (r, fleet) = typed(&raw(&aborted, false)).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamTruncated, "{e}");
    assert!(e.retryable);
    assert!(
        e.message.starts_with("Stream truncated for m at gpu0") && e.message.contains("\"abort\""),
        "{e}"
    );
    fleet.shutdown().await;

    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let r = openai_call(&front.base, &raw(&aborted, false), true).await;
    let body = r.text().await.unwrap();
    let payloads = sse_payloads(&body);
    assert!(!payloads.iter().any(|p| p == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_truncated", "{body}");
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn ollama_with_no_model_pulled_is_up_and_lists_nothing() {
    let fleet =
        Fleet::start(vec![host(&["m"]).sim(|c| {
            c.manifest_body = Some(json!({"object": "list", "data": null}))
        })])
        .await;
    fleet.dispatcher.refresh_manifests().await.unwrap();
    let status = fleet.status().await;
    assert!(status.hosts[0].reachable, "{status:#?}");
    assert!(status.hosts[0].state.models.is_empty());
    assert_eq!(status.hosts[0].state.last_error, None);

    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    use rmcp::ServiceExt;
    let client = ()
        .serve(rmcp::transport::StreamableHttpClientTransport::from_uri(
            format!("{}/mcp", front.base),
        ))
        .await
        .unwrap();
    let list = client
        .call_tool(CallToolRequestParams::new("list_models"))
        .await
        .unwrap();
    let data = list.structured_content.unwrap();
    assert_eq!(data["models"], json!([]));
    assert_eq!(data["unreachable"], json!([]), "{data}");
    assert_eq!(data["hosts"][0]["reachable"], true);
    client.cancel().await.unwrap();
    let models: Value = reqwest::get(format!("{}/v1/models", front.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"], json!([]));
    drop(front);
    fleet.shutdown().await;
}

/// A host that ends with a real finish reason but closes without `[DONE]`: the answer is
/// complete, and OpenAI clients (which read until `[DONE]`) get one from the daemon.
#[tokio::test]
async fn a_finished_stream_without_done_reaches_openai_clients_with_done() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let chunks = vec![
        chunk(json!({"role": "assistant", "content": "Hi"}), Value::Null),
        chunk(json!({}), json!("stop")),
    ];
    let r = openai_call(&front.base, &raw(&chunks, false), true).await;
    assert_eq!(r.status(), 200);
    let payloads = sse_payloads(&r.text().await.unwrap());
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{payloads:?}"
    );
    assert_eq!(payloads.iter().filter(|p| *p == "[DONE]").count(), 1);
    drop(front);
    fleet.shutdown().await;
}

/// A server that ignores `stream: true` answers with one JSON document, whole, at the end: its
/// arrival is no first-token time. Taken as one, every such task looked like a model load to
/// the cost model (a load as long as the task, a task priced at nothing), and a host added to
/// the fleet was never thought worth a load.
#[tokio::test]
async fn a_whole_json_answer_reports_no_first_token_time() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let document = json!({"id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "whole"}}]});
    let content = sim_directive(json!({"raw": {"status": 200,
        "content_type": "application/json", "chunks": [document.to_string()]}}));
    let result: CompletionResult = fleet
        .dispatcher
        .run(spec("m", &content, json!({})), |_| {})
        .await
        .unwrap();
    assert_eq!(result.text, "whole");
    assert_eq!(result.ttft_ms, None, "no first token was seen apart");
    fleet.shutdown().await;
}
