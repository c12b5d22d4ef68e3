//! The host client against the quirks of real servers, over real HTTP: null and empty
//! choices, usage-only chunks, bad lines, truncated and aborted streams, empty answers,
//! tool-call fragments, in-stream errors, auth failures, error statuses and silences.

mod common;

use std::time::Duration;

use common::{Fleet, host, spec};
use prix_dispatch::sim::{Outcome, sim_directive};
use prix_dispatch::{CompletionResult, DispatchError, ErrorKind};
use serde_json::{Value, json};

async fn one(directive: Value, extra: Value) -> (Result<CompletionResult, DispatchError>, Fleet) {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let result = fleet
        .dispatcher
        .run(spec("m", &sim_directive(directive), extra), |_| {})
        .await;
    (result, fleet)
}

#[tokio::test]
async fn a_normal_stream_yields_text_usage_and_finish_reason() {
    let (r, fleet) = one(json!({"tokens": 3}), json!({})).await;
    let r = r.unwrap();
    assert_eq!(r.text, "tok0 tok1 tok2 ");
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.usage.unwrap().completion_tokens, 3);
    assert_eq!((r.host.as_str(), r.model.as_str()), ("gpu0", "m"));
    assert!(r.ttft_ms.is_some() && r.latency_ms >= r.ttft_ms.unwrap());
    let body = &fleet.chat_records(0)[0].body;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 2048);
    assert_eq!(body["temperature"], 0.7);
    fleet.shutdown().await;
}

#[tokio::test]
async fn null_and_empty_choices_and_bad_lines_are_tolerated() {
    let (r, fleet) = one(json!({"tokens": 4, "malformed": true}), json!({})).await;
    assert_eq!(r.unwrap().text, "tok0 tok1 tok2 tok3 ");
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_empty_answer_with_done_is_valid() {
    let (r, fleet) = one(json!({"tokens": 0}), json!({})).await;
    let r = r.unwrap();
    assert_eq!(r.text, "");
    assert!(r.tool_calls.is_empty());
    fleet.shutdown().await;
}

#[tokio::test]
async fn no_done_and_no_content_is_an_aborted_stream() {
    let (r, fleet) = one(json!({"tokens": 3, "end_after_tokens": 0}), json!({})).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamAborted);
    assert!(
        e.message.contains("Stream aborted for m at gpu0") && e.retryable,
        "{e}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn content_without_done_is_a_truncated_stream_not_a_success() {
    let (r, fleet) = one(json!({"tokens": 5, "end_after_tokens": 2}), json!({})).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamTruncated, "{e}");
    assert!(e.retryable);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_connection_dropped_mid_stream_is_truncation() {
    let (r, fleet) = one(json!({"tokens": 5, "drop_after_tokens": 2}), json!({})).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamTruncated, "{e}");
    assert!(e.message.contains("connection lost"), "{e}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn tool_call_fragments_become_one_call() {
    let tools = json!({"tools": [{"name": "read_file", "description": "read", "parameters": {"type": "object"}}]});
    let (r, fleet) = one(
        json!({"tokens": 0, "tool_call": {"name": "read_file", "arguments": "{\"path\":\"./1.txt\"}", "fragments": 5}}),
        tools,
    )
    .await;
    let r = r.unwrap();
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].name, "read_file");
    assert!(r.tool_calls[0].id.is_some());
    let args: Value = serde_json::from_str(&r.tool_calls[0].arguments).unwrap();
    assert_eq!(args["path"], "./1.txt");
    assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
    assert!(!r.text.contains("__TOOL_CALLS__"), "no sentinels in text");
    let body = &fleet.chat_records(0)[0].body;
    assert_eq!(
        body["tools"][0]["type"], "function",
        "flat tools are normalised"
    );
    assert_eq!(body["tools"][0]["function"]["name"], "read_file");
    fleet.shutdown().await;
}

#[tokio::test]
async fn reasoning_is_returned_apart_from_text() {
    let (r, fleet) = one(json!({"tokens": 2, "reasoning_tokens": 3}), json!({})).await;
    let r = r.unwrap();
    assert_eq!(r.reasoning.as_deref(), Some("think0 think1 think2 "));
    assert_eq!(r.text, "tok0 tok1 ");
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_error_chunk_in_the_stream_fails_the_task() {
    let (r, fleet) = one(
        json!({"tokens": 2, "in_stream_error": "Model unloaded"}),
        json!({}),
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamError);
    assert!(e.message.contains("Model unloaded"), "{e}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn http_errors_carry_the_hosts_message() {
    let (r, fleet) = one(
        json!({"fail_status": 500, "fail_message": "CUDA out of memory"}),
        json!({}),
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::HostError);
    assert!(
        e.message.contains("HTTP 500") && e.message.contains("CUDA out of memory"),
        "{e}"
    );
    assert!(e.retryable, "5xx is worth a retry");
    fleet.shutdown().await;

    let (r, fleet) = one(
        json!({"fail_status": 400, "fail_message": "context too long"}),
        json!({}),
    )
    .await;
    let e = r.unwrap_err();
    assert!(!e.retryable, "4xx is not");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_rejected_key_is_an_authentication_error() {
    let fleet = Fleet::start(vec![
        host(&["m"])
            .key("good")
            .sim(|c| c.required_key = Some("good".into())),
    ])
    .await;
    let e = fleet
        .dispatcher
        .run(spec("m", "hi", json!({"api_key": "wrong"})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Authentication);
    assert!(
        e.message.starts_with("Authentication failed for m at gpu0"),
        "{e}"
    );
    assert!(
        !e.message.contains("wrong") && !e.message.contains("good"),
        "no key in errors"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn silence_before_the_first_byte_times_out_and_drops_the_connection() {
    let (r, fleet) = one(
        json!({"hang_before_first_byte": true}),
        json!({"first_token_timeout_seconds": 0.3, "timeout_seconds": 60}),
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(
        e.message.starts_with("first-token timeout") && e.retryable,
        "{e}"
    );
    assert!(fleet.sims[0].wait_idle(Duration::from_secs(1)).await);
    assert_eq!(
        fleet.chat_records(0)[0].outcome,
        Outcome::ClientDisconnected
    );
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn silence_mid_stream_times_out() {
    let (r, fleet) = one(
        json!({"tokens": 5, "hang_after_tokens": 2}),
        json!({"timeout_seconds": 0.3}),
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(
        e.message.starts_with("inactivity timeout") && e.message.contains("mid-stream"),
        "{e}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_slow_stream_within_the_gap_limit_is_not_a_timeout() {
    // Total time 1 s, every gap 0.1 s, limit 0.4 s: timeout_seconds is an inactivity bound.
    let (r, fleet) = one(
        json!({"tokens": 10, "token_interval_ms": 100}),
        json!({"timeout_seconds": 0.4}),
    )
    .await;
    assert_eq!(r.unwrap().text.split_whitespace().count(), 10);
    fleet.shutdown().await;
}

#[tokio::test]
async fn optional_parameters_reach_the_host_as_documented() {
    let extra = json!({
        "seed": 7,
        "repeat_penalty": 1.0,
        "response_format": {"type": "json_object"},
        "tool_choice": "auto",
        "temperature": 0.0,
        "max_tokens": 5,
    });
    let (r, fleet) = one(json!({"tokens": 2}), extra).await;
    r.unwrap();
    let body = &fleet.chat_records(0)[0].body;
    assert_eq!(body["seed"], 7);
    assert!(
        body.get("repeat_penalty").is_none(),
        "1.0 changes nothing and is not sent"
    );
    assert_eq!(body["response_format"]["type"], "json_object");
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["max_tokens"], 5);
    fleet.shutdown().await;
}

#[tokio::test]
async fn lm_studio_loaded_state_is_reported() {
    let fleet = Fleet::start(vec![
        host(&["m", "n"]).sim(|c| c.initially_loaded = Some("n".into())),
    ])
    .await;
    fleet.dispatcher.refresh_manifests().await.unwrap();
    let status = fleet.status().await;
    assert_eq!(
        status.hosts[0].state.loaded_models.as_deref(),
        Some(&["n".to_string()][..])
    );
    assert_eq!(status.hosts[0].state.models, vec!["m", "n"]);
    fleet.shutdown().await;
}
