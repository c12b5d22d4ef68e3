//! End-to-end tests: a real `SimHost` on 127.0.0.1:0 driven with reqwest.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use super::*;

const PATIENCE: Duration = Duration::from_secs(3);

fn chat_body(model: &str, stream: bool, content: &str) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

fn directed(model: &str, stream: bool, overrides: Value) -> Value {
    chat_body(model, stream, &sim_directive(overrides))
}

async fn post(host: &SimHost, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", host.url()))
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn get_json(host: &SimHost, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("{}{path}", host.url()))
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// The content of a non-streaming answer.
async fn answer(host: &SimHost, body: Value) -> String {
    let reply: Value = post(host, "/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The `data:` payloads of an SSE body, in order.
fn data_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect()
}

/// The chunks a tolerant client would act on.
fn chunks(text: &str) -> Vec<Value> {
    data_lines(text)
        .into_iter()
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect()
}

fn content_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

fn finish_reasons(chunks: &[Value]) -> Vec<&str> {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
        })
        .collect()
}

/// Polls until the record with `seq` satisfies `done`, then returns it.
async fn record_when(
    host: &SimHost,
    seq: u64,
    done: impl Fn(&RequestRecord) -> bool,
) -> RequestRecord {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let record = host.records().into_iter().find(|r| r.seq == seq);
        match record {
            Some(record) if done(&record) => return record,
            _ if tokio::time::Instant::now() > deadline => {
                panic!("record {seq} never got there: {record:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn lists_models_in_all_three_formats() {
    let config = SimConfig {
        initially_loaded: Some("b".to_owned()),
        ..SimConfig::with_models(["a", "b"])
    };
    let host = SimHost::start(config).await.unwrap();
    let (status, listing) = get_json(&host, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(
        listing,
        json!({"object": "list", "data": [
            {"id": "a", "object": "model", "owned_by": "organization_owner"},
            {"id": "b", "object": "model", "owned_by": "organization_owner"},
        ]})
    );
    let (_, v0) = get_json(&host, "/api/v0/models").await;
    assert_eq!(v0["data"][0]["state"], "not-loaded");
    assert_eq!(v0["data"][1]["state"], "loaded");
    assert_eq!(v0["data"][1]["max_context_length"], 4096);

    post(&host, "/v1/chat/completions", &chat_body("a", false, "hi")).await;
    let (_, v1) = get_json(&host, "/api/v1/models").await;
    assert_eq!(v1["models"][0]["key"], "a");
    assert_eq!(v1["models"][0]["loaded_instances"], json!([{"id": "a"}]));
    assert_eq!(v1["models"][1]["loaded_instances"], json!([]));
    // Only the OpenAI listing counts as a manifest call.
    assert_eq!(host.stats().manifest_calls, 1);
    assert_eq!(host.records().len(), 4);
}

#[tokio::test]
async fn manifest_sequence_decides_what_is_listed_and_served() {
    let config = SimConfig {
        manifest_sequence: Some(vec![vec![], vec!["m".to_owned()]]),
        ..SimConfig::default()
    };
    let host = SimHost::start(config).await.unwrap();
    let missing = post(&host, "/v1/chat/completions", &chat_body("m", false, "hi")).await;
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(
        error,
        json!({"error": {"message": "Model 'm' not found", "type": "invalid_request_error", "code": "model_not_found"}})
    );
    let mut listed = Vec::new();
    for _ in 0..3 {
        let (_, listing) = get_json(&host, "/v1/models").await;
        listed.push(listing["data"].as_array().unwrap().len());
    }
    assert_eq!(listed, [0, 1, 1]);
    let found = post(&host, "/v1/chat/completions", &chat_body("m", false, "hi")).await;
    assert_eq!(found.status(), 200);
    assert_eq!(host.stats().manifest_calls, 3);
    assert_eq!(host.chat_records()[0].outcome, Outcome::FailedStatus(404));

    host.update_config(|c| c.manifest_status = Some(503));
    let (status, body) = get_json(&host, "/v1/models").await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test]
async fn unknown_endpoints_get_lm_studios_200_error() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let (status, body) = get_json(&host, "/v1/embeddings/nope").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"error": "Unexpected endpoint or method. (GET /v1/embeddings/nope)"})
    );
    let wrong_method = post(&host, "/v1/models", &json!({})).await;
    assert_eq!(wrong_method.status(), 200);
    let body: Value = wrong_method.json().await.unwrap();
    assert_eq!(
        body["error"],
        "Unexpected endpoint or method. (POST /v1/models)"
    );
    let records = host.records();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
}

#[tokio::test]
async fn a_required_key_guards_the_api_but_not_sim_control() {
    let config = SimConfig {
        required_key: Some("sekrit".to_owned()),
        ..SimConfig::default()
    };
    let host = SimHost::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", host.url());
    let body = chat_body("sim-model", false, "hi");

    let anonymous = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let error: Value = anonymous.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    let wrong = client
        .get(format!("{}/api/v0/models", host.url()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client
        .post(&url)
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let (status, _) = get_json(&host, "/sim/records").await;
    assert_eq!(status, 200);

    let records = host.records();
    let outcomes: Vec<Outcome> = records.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::FailedStatus(401),
            Outcome::FailedStatus(401),
            Outcome::Completed
        ]
    );
    assert_eq!(records[0].auth, None);
    assert_eq!(records[1].auth.as_deref(), Some("Bearer nope"));
    assert_eq!(records[2].body, body);
    assert_eq!(
        host.stats().peak_in_flight,
        1,
        "rejected requests are never in flight"
    );
}

#[tokio::test]
async fn streams_like_lm_studio() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let mut body = directed("sim-model", true, json!({"tokens": 3}));
    body["stream_options"] = json!({"include_usage": true});
    let response = post(&host, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks = chunks(&text);
    assert_eq!(chunks.len(), 6, "role, 3 tokens, finish, usage: {text}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "sim-model");
        assert!(chunk["id"].is_string() && chunk["created"].is_u64());
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    assert_eq!(content_of(&chunks), "tok0 tok1 tok2 ");
    assert_eq!(finish_reasons(&chunks), ["stop"]);
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["completion_tokens"], 3);

    // Without include_usage there is no usage chunk.
    let text = post(
        &host,
        "/v1/chat/completions",
        &chat_body("sim-model", true, "hi"),
    )
    .await
    .text()
    .await
    .unwrap();
    let plain = self::chunks(&text);
    assert_eq!(plain.len(), 7);
    assert!(plain.iter().all(|c| c.get("usage").is_none()));

    let record = &host.chat_records()[0];
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.tokens_sent, 3);
    assert!(record.stream);
    assert_eq!(record.model.as_deref(), Some("sim-model"));
    let (start, first, end) = (
        record.start_us,
        record.first_byte_us.unwrap(),
        record.end_us.unwrap(),
    );
    assert!(start <= first && first <= end);
    assert!(host.wait_idle(PATIENCE).await);
}

#[tokio::test]
async fn each_token_reaches_the_client_when_produced() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let body = directed(
        "sim-model",
        true,
        json!({"tokens": 3, "token_interval_ms": 80}),
    );
    let mut stream = post(&host, "/v1/chat/completions", &body)
        .await
        .bytes_stream();
    let mut arrivals = Vec::new();
    while let Some(bytes) = stream.next().await {
        let text = String::from_utf8_lossy(&bytes.unwrap()).into_owned();
        if !content_of(&chunks(&text)).is_empty() {
            arrivals.push(std::time::Instant::now());
        }
    }
    assert_eq!(arrivals.len(), 3, "one read per token, nothing held back");
    assert!(arrivals[2] - arrivals[0] >= Duration::from_millis(120));
}

#[tokio::test]
async fn empty_answers_and_max_tokens() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let text = post(
        &host,
        "/v1/chat/completions",
        &directed("sim-model", true, json!({"tokens": 0})),
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(data_lines(&text).len(), 3, "role, finish, [DONE]: {text}");
    assert_eq!(finish_reasons(&chunks(&text)), ["stop"]);

    let mut body = chat_body("sim-model", true, "hi");
    body["max_tokens"] = json!(2);
    let text = post(&host, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks(&text);
    assert_eq!(content_of(&chunks), "tok0 tok1 ");
    assert_eq!(finish_reasons(&chunks), ["length"]);
}

#[tokio::test]
async fn non_streaming_answer_takes_the_same_time() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let overrides = json!({"tokens": 2, "ttft_ms": 40, "token_interval_ms": 30, "token_text": "w", "reasoning_tokens": 1});
    let started = std::time::Instant::now();
    let response = post(
        &host,
        "/v1/chat/completions",
        &directed("sim-model", false, overrides),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(130));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "w0 w1 ");
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"],
        "think0 "
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let record = &host.chat_records()[0];
    assert!(!record.stream);
    assert_eq!(record.tokens_sent, 2);
    assert!(record.first_byte_us.unwrap() - record.start_us >= 130_000);
}

#[tokio::test]
async fn per_model_behaviour_and_directives() {
    let mut config = SimConfig::with_models(["a", "b"]);
    config.per_model.insert(
        "b".to_owned(),
        Behaviour {
            token_text: "bee".to_owned(),
            tokens: 1,
            ..Behaviour::default()
        },
    );
    let host = SimHost::start(config).await.unwrap();
    assert_eq!(
        answer(&host, chat_body("a", false, "hi")).await,
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert_eq!(answer(&host, chat_body("b", false, "hi")).await, "bee0 ");
    assert_eq!(
        answer(&host, directed("b", false, json!({"tokens": 2}))).await,
        "bee0 bee1 "
    );

    let typo = post(
        &host,
        "/v1/chat/completions",
        &directed("a", false, json!({"tokns": 2})),
    )
    .await;
    assert_eq!(typo.status(), 400);
    let garbage = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", host.url()))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let error: Value = garbage.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let failing = post(
        &host,
        "/v1/chat/completions",
        &directed("a", true, json!({"fail_status": 503})),
    )
    .await;
    assert_eq!(failing.status(), 503);
    let error: Value = failing.json().await.unwrap();
    assert_eq!(error["error"]["message"], "simulated failure");
    let last = host.chat_records().pop().unwrap();
    assert_eq!(last.outcome, Outcome::FailedStatus(503));
}

#[tokio::test]
async fn tool_calls_stream_in_fragments() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let tool = json!({"name": "lookup", "arguments": "{\"q\":\"rust\"}", "fragments": 3});
    let body = directed("sim-model", true, json!({"tokens": 0, "tool_call": tool}));
    let text = post(&host, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks(&text);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0"))
        .collect();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls[0]["id"],
        format!("call_sim_{}", host.chat_records()[0].seq)
    );
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "lookup");
    assert!(calls[1].get("id").is_none() && calls[1]["function"].get("name").is_none());
    let arguments: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"q\":\"rust\"}");
    assert_eq!(finish_reasons(&chunks), ["tool_calls"]);
}

#[tokio::test]
async fn quirky_streams_still_carry_their_content() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let body = directed("sim-model", true, json!({"tokens": 2, "malformed": true}));
    let text = post(&host, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    for quirk in [
        "data: {not json",
        "\"choices\":null",
        "\"choices\":[]",
        ": keep-alive",
        "event: ping",
    ] {
        assert!(text.contains(quirk), "missing {quirk}: {text}");
    }
    assert_eq!(content_of(&chunks(&text)), "tok0 tok1 ");

    let body = directed(
        "sim-model",
        true,
        json!({"tokens": 1, "in_stream_error": "out of memory"}),
    );
    let text = post(&host, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let last = chunks(&text).pop().unwrap();
    assert_eq!(
        last,
        json!({"error": {"message": "out of memory", "type": "server_error"}})
    );
    assert!(!text.contains("[DONE]"));
    assert_eq!(host.chat_records()[1].outcome, Outcome::StreamError);
}

#[tokio::test]
async fn drop_after_tokens_breaks_the_connection() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let body = directed("sim-model", true, json!({"drop_after_tokens": 2}));
    let response = post(&host, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut received = String::new();
    let mut stream = response.bytes_stream();
    let error = loop {
        match stream.next().await {
            Some(Ok(bytes)) => received.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Err(err)) => break err,
            None => panic!("body ended cleanly: {received}"),
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert_eq!(content_of(&chunks(&received)), "tok0 tok1 ");
    let record = record_when(&host, 1, RequestRecord::is_finished).await;
    assert_eq!(record.outcome, Outcome::Dropped);
    assert_eq!(record.tokens_sent, 2);
}

#[tokio::test]
async fn end_after_tokens_ends_cleanly_but_unfinished() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let body = directed("sim-model", true, json!({"end_after_tokens": 1}));
    let text = post(&host, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks(&text);
    assert_eq!(content_of(&chunks), "tok0 ");
    assert!(finish_reasons(&chunks).is_empty());
    assert!(!text.contains("[DONE]"));
    assert_eq!(host.chat_records()[0].outcome, Outcome::Truncated);
}

#[tokio::test]
async fn non_streaming_failure_modes() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let send = |overrides: Value| {
        let body = directed("sim-model", false, overrides);
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", host.url()))
            .json(&body)
            .send()
    };
    let broken = match send(json!({"drop_after_tokens": 1})).await {
        Ok(response) => response.bytes().await.is_err(),
        Err(_) => true,
    };
    assert!(broken, "a dropped answer must not read as complete");
    let truncated = send(json!({"end_after_tokens": 1})).await.unwrap();
    let text = truncated.text().await.unwrap();
    assert!(
        text.starts_with('{') && serde_json::from_str::<Value>(&text).is_err(),
        "{text}"
    );
    let failed = send(json!({"in_stream_error": "boom"})).await.unwrap();
    assert_eq!(failed.status(), 500);
    let outcomes: Vec<Outcome> = host.chat_records().iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Dropped,
            Outcome::Truncated,
            Outcome::FailedStatus(500)
        ]
    );
}

#[tokio::test]
async fn client_disconnects_are_recorded() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    // Mid-stream: the client drops the body while the host is silent.
    let body = directed("sim-model", true, json!({"hang_after_tokens": 1}));
    let mut stream = post(&host, "/v1/chat/completions", &body)
        .await
        .bytes_stream();
    stream.next().await.unwrap().unwrap();
    let record = record_when(&host, 1, |r| r.tokens_sent == 1).await;
    assert_eq!(record.outcome, Outcome::InProgress);
    drop(stream);
    let record = record_when(&host, 1, RequestRecord::is_finished).await;
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert!(record.end_us.is_some());

    // Before the first byte: the client gives up waiting for headers.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let body = directed("sim-model", true, json!({"hang_before_first_byte": true}));
    let url = format!("{}/v1/chat/completions", host.url());
    assert!(
        client
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_err()
            .is_timeout()
    );
    let record = record_when(&host, 2, RequestRecord::is_finished).await;
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert_eq!(record.first_byte_us, None);
    assert!(host.wait_idle(PATIENCE).await);
}

#[tokio::test]
async fn auto_evict_aborts_streams_of_other_models() {
    let config = SimConfig {
        auto_evict: true,
        ..SimConfig::with_models(["a", "b"])
    };
    let host = SimHost::start(config).await.unwrap();
    let slow = directed("a", true, json!({"tokens": 50, "token_interval_ms": 20}));
    let mut stream = post(&host, "/v1/chat/completions", &slow)
        .await
        .bytes_stream();
    record_when(&host, 1, |r| r.tokens_sent >= 1).await;

    let quick = post(&host, "/v1/chat/completions", &chat_body("b", false, "hi")).await;
    assert_eq!(quick.status(), 200);
    let evicted = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(evicted, "the stream of model a must break off");
    let records = host.chat_records();
    assert_eq!(records[0].outcome, Outcome::Evicted);
    assert!(records[0].tokens_sent < 50);
    assert_eq!(records[1].outcome, Outcome::Completed);
    assert_eq!(records[1].other_models_in_flight_at_start, ["a"]);
    assert_eq!(host.stats().model_overlaps, 1);
    assert!(host.wait_idle(PATIENCE).await);
}

#[tokio::test]
async fn auto_evict_also_reaches_requests_still_waiting_for_their_first_byte() {
    let config = SimConfig {
        auto_evict: true,
        ..SimConfig::with_models(["a", "b"])
    };
    let host = SimHost::start(config).await.unwrap();
    let waiting = directed("a", false, json!({"hang_before_first_byte": true}));
    let first = tokio::spawn({
        let url = format!("{}/v1/chat/completions", host.url());
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&waiting)
                .send()
                .await?
                .bytes()
                .await
        }
    });
    record_when(&host, 1, |r| r.in_flight_at_start == 1).await;
    post(&host, "/v1/chat/completions", &chat_body("b", true, "hi")).await;
    assert!(first.await.unwrap().is_err());
    assert_eq!(host.chat_records()[0].outcome, Outcome::Evicted);
    assert!(host.wait_idle(PATIENCE).await);
}

#[tokio::test]
async fn concurrency_and_model_overlaps_are_counted() {
    let host = SimHost::start(SimConfig::with_models(["a", "b"]))
        .await
        .unwrap();
    let slow = json!({"ttft_ms": 250, "tokens": 1});
    let (for_a, for_b) = (
        directed("a", false, slow.clone()),
        directed("b", false, slow),
    );
    let (first, second) = tokio::join!(
        post(&host, "/v1/chat/completions", &for_a),
        post(&host, "/v1/chat/completions", &for_b),
    );
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let stats = host.stats();
    assert_eq!(stats.peak_in_flight, 2);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.model_overlaps, 1);
    let records = host.chat_records();
    let later = &records[1];
    let earlier_model = records[0].model.clone().unwrap();
    assert_eq!(later.in_flight_at_start, 2);
    assert_eq!(later.other_models_in_flight_at_start, [earlier_model]);
    assert_eq!(records[0].in_flight_at_start, 1);
}

#[tokio::test]
async fn shutdown_cuts_open_connections() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let url = host.url();
    let body = directed("sim-model", true, json!({"hang_after_tokens": 0}));
    let mut stream = post(&host, "/v1/chat/completions", &body)
        .await
        .bytes_stream();
    stream.next().await.unwrap().unwrap();
    host.shutdown().await;
    let next = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("connection cut");
    assert!(!matches!(next, Some(Ok(_))), "no more data after shutdown");
    assert!(reqwest::get(format!("{url}/v1/models")).await.is_err());
}

#[tokio::test]
async fn sim_endpoints_steer_and_report() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let config = json!({"models": ["x"], "default": {"tokens": 1}});
    assert_eq!(post(&host, "/sim/config", &config).await.status(), 204);
    assert_eq!(host.config().models, ["x"]);
    let reply: Value = post(&host, "/v1/chat/completions", &chat_body("x", false, "hi"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "tok0 ");

    let (_, report) = get_json(&host, "/sim/records").await;
    assert_eq!(report["records"].as_array().unwrap().len(), 1);
    assert_eq!(report["records"][0]["outcome"], "completed");
    assert_eq!(report["stats"]["peak_in_flight"], 1);
    let records: Vec<RequestRecord> = serde_json::from_value(report["records"].clone()).unwrap();
    assert_eq!(records, host.records());

    assert_eq!(post(&host, "/sim/reset", &json!(null)).await.status(), 204);
    assert!(host.records().is_empty());
    assert_eq!(host.stats(), SimStats::default());
}

#[tokio::test]
async fn raw_replies_are_sent_byte_for_byte() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    let chunks = ["error: {\"code\":400}\n\n", "data: [DONE]\n\n"];
    let body = directed("sim-model", true, json!({"raw": {"chunks": chunks}}));
    let response = post(&host, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.text().await.unwrap(), chunks.concat());
    assert_eq!(host.chat_records()[0].outcome, Outcome::Completed);

    let json_error = "{\"error\":\"Unexpected endpoint or method. (POST /chat/completions)\"}";
    let body = directed(
        "sim-model",
        true,
        json!({"raw": {"status": 400, "content_type": "application/json", "chunks": [json_error]}}),
    );
    let response = post(&host, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.text().await.unwrap(), json_error);
    let record = record_when(&host, 2, RequestRecord::is_finished).await;
    assert_eq!(record.outcome, Outcome::FailedStatus(400));

    let body = directed(
        "sim-model",
        true,
        json!({"raw": {"chunks": ["data: {\"x\":1}\n\n"], "abort": true}}),
    );
    let response = post(&host, "/v1/chat/completions", &body).await;
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    let error = loop {
        match stream.next().await {
            Some(Ok(bytes)) => received.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Err(err)) => break err,
            None => panic!("body ended cleanly: {received}"),
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert_eq!(received, "data: {\"x\":1}\n\n");
    let record = record_when(&host, 3, RequestRecord::is_finished).await;
    assert_eq!(record.outcome, Outcome::Dropped);
}

#[tokio::test]
async fn a_raw_manifest_body_is_served_as_given() {
    let host = SimHost::start(SimConfig {
        manifest_body: Some(json!({"object": "list", "data": null})),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let (status, body) = get_json(&host, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"object": "list", "data": null}));
}
