//! `serve`'s HTTP surfaces over real sockets: the OpenAI-compatible API (relay without
//! buffering, errors, disconnects), MCP over Streamable HTTP, auth, limits, metrics, status.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Fleet, HostPlan, HttpFront, assert_host_invariants, host, quick, sample, scrape};
use futures::StreamExt;
use prix_dispatch::sim::{Outcome, sim_directive};
use serde_json::{Value, json};

struct Daemon {
    fleet: Fleet,
    base: String,
    _front: HttpFront,
}

async fn daemon(
    plans: Vec<HostPlan>,
    token: Option<&str>,
    tune: impl FnOnce(&mut prix_dispatch::Config),
) -> Daemon {
    let fleet = Fleet::start_tuned(plans, tune).await;
    let front = HttpFront::start(&fleet.dispatcher, token, 64 * 1024).await;
    Daemon {
        base: front.base.clone(),
        fleet,
        _front: front,
    }
}

impl Daemon {
    async fn shutdown(self) {
        drop(self._front);
        self.fleet.shutdown().await;
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// An rmcp client session with the daemon's `/mcp` at `base`.
async fn mcp_over_http(base: &str) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    use rmcp::ServiceExt;
    ().serve(rmcp::transport::StreamableHttpClientTransport::from_uri(
        format!("{base}/mcp"),
    ))
    .await
    .unwrap()
}

/// POST `body` to the daemon's `/v1/chat/completions` at `base`.
async fn post_chat(base: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// GET `path` on the daemon at `base`, as JSON.
async fn get_json(client: &reqwest::Client, base: &str, path: &str) -> Value {
    client
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn chat(model: &str, content: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream})
}

#[tokio::test]
async fn streaming_is_relayed_as_it_arrives_with_dispatch_headers() {
    let d = daemon(vec![host(&["m"]).behaviour(quick(6, 100))], None, |_| {}).await;
    let mut body = chat("m", "hi", true);
    body["x_unknown_field"] = json!({"kept": true});
    let response = post_chat(&d.base, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-prix-host"], "gpu0");
    assert!(
        response.headers()["x-prix-queue-wait-ms"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .is_ok()
    );
    let mut stream = response.bytes_stream();
    let mut first_content_at = None;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        if first_content_at.is_none() && chunk.contains("tok0") {
            first_content_at = Some(now_us());
        }
        text.push_str(&chunk);
    }
    assert!(text.contains("data: [DONE]"));
    let record = &d.fleet.chat_records(0)[0];
    assert!(
        first_content_at.unwrap() < record.end_us.unwrap(),
        "the first token reached the client before the host finished: no buffering"
    );
    assert_eq!(
        record.body["x_unknown_field"]["kept"], true,
        "unknown fields are forwarded"
    );
    assert!(
        record.body.get("stream_options").is_none(),
        "the body is the client's own"
    );
    d.shutdown().await;
}

#[tokio::test]
async fn non_streaming_answers_are_relayed_whole() {
    let d = daemon(vec![host(&["m"]).behaviour(quick(3, 1))], None, |_| {}).await;
    let response = post_chat(&d.base, &chat("m", "hi", false)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
    d.shutdown().await;
}

#[tokio::test]
async fn errors_use_openai_shape_and_fitting_statuses() {
    let d = daemon(vec![host(&["m"]).behaviour(quick(20, 50))], None, |c| {
        c.queue.max_pending = 1;
        c.timeouts.first_token = Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", d.base);
    let post = |body: Value| client.post(&url).json(&body).send();

    let r = post(chat("nope", "hi", false)).await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_available");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Model 'nope' not available on any server")
            && message.contains("gpu0 lists 1 model)")
            && message.contains("GET /v1/models"),
        "an OpenAI client is told the listing it has: {message}"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let r = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(json!({"model": "m", "messages": []})).await.unwrap();
    assert_eq!(r.status(), 400);

    let r = post(chat("m", &sim_directive(json!({"ttft_ms": 1000})), false))
        .await
        .unwrap();
    assert_eq!(r.status(), 504, "first-token timeout");
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first-token timeout")
    );

    // One running, one waiting: the next is refused with 429.
    let running = tokio::spawn(post(chat("m", "hi", true)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::spawn(post(chat("m", "hi", false)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = post(chat("m", "hi", false)).await.unwrap();
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    drop((running, waiting));
    d.shutdown().await;
}

#[tokio::test]
async fn no_healthy_host_is_503() {
    let mut d = daemon(vec![host(&["m"])], None, |c| {
        c.queue.host_wait = Duration::from_millis(200);
        c.health.probe_interval = Duration::from_secs(60);
    })
    .await;
    d.fleet.dispatcher.refresh_manifests().await.unwrap();
    let _killed = d.fleet.kill(0).await;
    let r = post_chat(&d.base, &chat("m", "hi", false)).await;
    assert_eq!(r.status(), 503);
    d.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_frees_the_slot_and_the_host() {
    let d = daemon(vec![host(&["m"]).behaviour(quick(500, 10))], None, |_| {}).await;
    let response = post_chat(&d.base, &chat("m", "hi", true)).await;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        if String::from_utf8_lossy(&chunk.unwrap()).contains("tok1") {
            break;
        }
    }
    drop(stream);
    assert!(d.fleet.sims[0].wait_idle(Duration::from_secs(1)).await);
    assert_eq!(
        d.fleet.chat_records(0)[0].outcome,
        Outcome::ClientDisconnected
    );
    d.fleet
        .assert_all_slots_return(Duration::from_secs(1))
        .await;
    assert_eq!(d.fleet.status().await.counters.cancelled, 1);
    d.shutdown().await;
}

#[tokio::test]
async fn a_token_guards_every_route_but_healthz() {
    let d = daemon(
        vec![host(&["m"]).behaviour(quick(1, 0))],
        Some("s3cret-token"),
        |_| {},
    )
    .await;
    let client = reqwest::Client::new();
    for path in ["/", "/status", "/metrics", "/v1/models"] {
        for (token, expected) in [
            (None, 401),
            (Some("wrong"), 401),
            (Some("s3cret-token"), 200),
        ] {
            let mut request = client.get(format!("{}{path}", d.base));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), expected, "{path} with {token:?}");
        }
    }
    let r = client
        .post(format!("{}/mcp", d.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "/mcp");
    let r = client
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The browser form for the status page.
    let r = client
        .get(format!("{}/status?token=s3cret-token", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{}/v1/chat/completions", d.base))
        .bearer_auth("s3cret-token")
        .json(&chat("m", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let auth = d.fleet.chat_records(0)[0].auth.clone();
    assert_eq!(
        auth, None,
        "the daemon's token is never forwarded to a host"
    );
    d.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let d = daemon(vec![host(&["m"])], None, |_| {}).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", d.base))
        .json(&chat("m", &"x".repeat(100 * 1024), false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let body: serde_json::Value = r.json().await.expect("an OpenAI error body");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_request_bytes"), "{body}");
    let limit = format!("({} bytes", d.fleet.dispatcher.max_request_bytes());
    assert!(message.contains(&limit), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(d.fleet.chat_records(0).is_empty());
    d.shutdown().await;
}

#[tokio::test]
async fn metrics_parse_and_move_when_tasks_run() {
    let d = daemon(vec![host(&["m"]).behaviour(quick(3, 1))], None, |_| {}).await;
    let before = scrape(&d.base).await;
    assert_eq!(sample(&before, "prix_host_slots{host=\"gpu0\"}"), 1.0);
    for _ in 0..3 {
        let r = post_chat(&d.base, &chat("m", "hi", true)).await;
        r.text().await.unwrap();
    }
    let after = scrape(&d.base).await;
    assert_eq!(
        sample(&after, "prix_tasks_total{outcome=\"completed\"}"),
        3.0
    );
    assert_eq!(sample(&after, "prix_task_duration_seconds_count"), 3.0);
    assert_eq!(
        sample(&after, "prix_time_to_first_token_seconds_count"),
        3.0
    );
    assert_eq!(
        sample(&after, "prix_queue_wait_seconds_count{class=\"anonymous\"}"),
        3.0
    );
    assert_eq!(sample(&after, "prix_host_up{host=\"gpu0\"}"), 1.0);
    assert_eq!(sample(&after, "prix_host_active{host=\"gpu0\"}"), 0.0);
    // The host starts empty (the simulator lists nothing loaded): one load, then warm.
    assert_eq!(
        sample(
            &after,
            "prix_host_model_loads_total{host=\"gpu0\",model=\"m\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "prix_host_model_resident{host=\"gpu0\",model=\"m\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "prix_host_busy_elsewhere{host=\"gpu0\"}"),
        0.0
    );
    d.shutdown().await;
}

#[tokio::test]
async fn models_status_and_mcp_over_http_share_the_queue() {
    use rmcp::model::CallToolRequestParams;

    let d = daemon(
        vec![host(&["m", "n"]).behaviour(quick(4, 20))],
        None,
        |_| {},
    )
    .await;
    let client = reqwest::Client::new();
    let models: Value = get_json(&client, &d.base, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m", "n"]);
    assert_eq!(models["object"], "list");

    let mcp = mcp_over_http(&d.base).await;
    let tools = mcp.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 4);
    // MCP over HTTP, the OpenAI API and in-process submissions, all at once, one slot.
    let mcp_calls = (0..3).map(|_| {
        let args = json!({"model_id": "m", "messages": [{"role": "user", "content": "hi"}]});
        mcp.call_tool(
            CallToolRequestParams::new("complete_stream")
                .with_arguments(args.as_object().unwrap().clone()),
        )
    });
    let openai_calls = (0..3).map(|_| async {
        let r = post_chat(&d.base, &chat("n", "hi", true)).await;
        r.text().await.unwrap()
    });
    let direct = (0..3).map(|_| {
        d.fleet
            .dispatcher
            .run(common::spec("m", "hi", json!({})), |_| {})
    });
    let (m, o, x) = tokio::join!(
        futures::future::join_all(mcp_calls),
        futures::future::join_all(openai_calls),
        futures::future::join_all(direct)
    );
    assert!(
        m.iter()
            .all(|r| r.as_ref().unwrap().is_error == Some(false))
    );
    assert!(o.iter().all(|t| t.contains("[DONE]")));
    assert!(x.iter().all(Result::is_ok));
    let records = d.fleet.chat_records(0);
    assert_eq!(records.len(), 9);
    assert_host_invariants(&records, 1);
    assert_eq!(
        d.fleet.sims[0].stats().peak_in_flight,
        1,
        "the host never saw two at once"
    );

    let status: Value = get_json(&client, &d.base, "/status").await;
    assert_eq!(status["hosts"][0]["name"], "gpu0");
    assert_eq!(status["counters"]["completed"], 9);
    let page = client
        .get(format!("{}/", d.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<title>prix-dispatch</title>"));
    mcp.cancel().await.unwrap();
    d.shutdown().await;
}

#[tokio::test]
async fn mcp_checks_the_host_header() {
    let d = daemon(vec![host(&["m"])], None, |_| {}).await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let post = |host_header: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/mcp", d.base))
            .header("host", host_header)
            .header("accept", "application/json, text/event-stream")
            .json(&initialize)
            .send()
    };
    assert_eq!(
        post("evil.example:8765").await.unwrap().status(),
        403,
        "DNS rebinding guard"
    );
    assert_eq!(post("localhost").await.unwrap().status(), 200);
    d.shutdown().await;
}

#[tokio::test]
async fn an_mcp_session_over_http_is_listed_as_a_client_until_it_closes() {
    use rmcp::model::CallToolRequestParams;

    let d = daemon(vec![host(&["m"]).behaviour(quick(20, 25))], None, |_| {}).await;
    let http = reqwest::Client::new();
    let clients = || async {
        let status: Value = get_json(&http, &d.base, "/status").await;
        status["clients"].as_array().cloned().unwrap_or_default()
    };
    assert!(clients().await.is_empty());
    let mcp = mcp_over_http(&d.base).await;
    let args = json!({"model_id": "m", "messages": [{"role": "user", "content": "hi"}]});
    let call = mcp.call_tool(
        CallToolRequestParams::new("complete_stream")
            .with_arguments(args.as_object().unwrap().clone()),
    );
    let watch = async {
        // The call streams for ~0.5 s: meanwhile its session is a client with a running task.
        for _ in 0..40 {
            let listed = clients().await;
            if let Some(c) = listed.iter().find(|c| c["running"] == 1) {
                return Some(c.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    };
    let (result, seen) = tokio::join!(call, watch);
    assert_eq!(result.unwrap().is_error, Some(false));
    let seen = seen.expect("the HTTP session was listed with its running task");
    assert_eq!(seen["transport"], "http");
    assert!(seen["name"].is_string(), "named from its handshake: {seen}");
    mcp.cancel().await.unwrap();
    let mut left = clients().await;
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = clients().await;
    }
    assert!(left.is_empty(), "a closed session is no client: {left:?}");
    d.shutdown().await;
}

#[tokio::test]
async fn an_mcp_client_is_listed_by_name_from_its_handshake() {
    let d = daemon(vec![host(&["m"])], None, |_| {}).await;
    let http = reqwest::Client::new();
    let mcp = mcp_over_http(&d.base).await;
    let expected = rmcp::ClientHandler::get_info(&()).client_info.name;
    // No completion yet: the name comes from `initialize` (it appeared only with the first
    // `complete` before).
    let mut listed = Vec::new();
    for _ in 0..100 {
        let status: Value = get_json(&http, &d.base, "/status").await;
        listed = status["clients"].as_array().cloned().unwrap_or_default();
        if listed.iter().any(|c| c["name"] == expected.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        listed.iter().any(|c| c["name"] == expected.as_str()),
        "{expected:?} not among {listed:?}"
    );
    mcp.cancel().await.unwrap();
    d.shutdown().await;
}
