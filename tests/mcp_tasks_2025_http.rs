//! MCP tasks in the 2025-11-25 experimental form over Streamable HTTP (`/mcp`, the layer in
//! `src/http/tasks.rs`), against `serve` in front of a simulated one-slot host:
//!
//! 1. the TypeScript SDK 1.32.2 (`StreamableHTTPClientTransport`,
//!    `client.experimental.tasks.callToolStream`, tests/clients/ts_tasks_client.mjs) runs a
//!    ~6 s call under a fixed 3 s request timeout as a task; its result equals a plain call's,
//!    and a plain call under the same timeout times out, so the 3 s are real;
//! 2. raw JSON-RPC over HTTP: `initialize` declares the `tasks` capability, `tools/list`
//!    marks the task tools, `tools/call` with `task: {ttl}` is answered with a task,
//!    `tasks/get`, `tasks/list` (this session's only), `tasks/cancel` of a running task (the
//!    host's records show the request stopped; a later call runs), `tasks/result`; another
//!    session sees none of it and cannot cancel it.

mod common;

use std::time::{Duration, Instant};

use common::tasks::{
    JsonRpc, as_task, assert_cancel_again_refused, assert_later_task_is_a_plain_call,
    assert_task_support, assert_tasks_capability, assert_ts_tasks_report, call, create_task,
    listed_ids, outcomes, wait_generating,
};
use common::{Fleet, HttpFront, host};
use prix_dispatch::sim::Outcome;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_over_http_runs_a_6s_call_as_a_task_under_a_3s_timeout() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let report =
        common::clients::node_report("ts_tasks_client.mjs", [format!("{}/mcp", front.base)]).await;
    assert_ts_tasks_report(&report);
    drop(front);
    fleet.shutdown().await;
}

/// A bare JSON-RPC client of one MCP session over Streamable HTTP.
struct Session {
    http: reqwest::Client,
    url: String,
    id: Option<String>,
    next_id: u64,
}

impl Session {
    /// Initializes a session; returns it and the `initialize` result.
    async fn open(base: &str) -> (Session, Value) {
        let mut session = Session {
            http: reqwest::Client::new(),
            url: format!("{base}/mcp"),
            id: None,
            next_id: 0,
        };
        let init = session
            .result(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw-http-tasks", "version": "1"}}),
            )
            .await;
        let accepted = session
            .post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(accepted.status(), 202);
        (session, init)
    }

    async fn post(&mut self, message: Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(message.to_string());
        if let Some(id) = &self.id {
            request = request
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", "2025-11-25");
        }
        let response = request.send().await.unwrap();
        if let Some(id) = response.headers().get("mcp-session-id") {
            self.id = Some(id.to_str().unwrap().to_string());
        }
        response
    }
}

impl JsonRpc for Session {
    /// Sends a request; returns its answer, from a JSON body or from an SSE stream.
    async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let response = self
            .post(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        assert_eq!(response.status(), 200, "{method}");
        let sse = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.to_str().unwrap().starts_with("text/event-stream"));
        let body = tokio::time::timeout(Duration::from_secs(15), response.text())
            .await
            .unwrap_or_else(|_| panic!("no answer to {method}"))
            .unwrap();
        if !sse {
            return serde_json::from_str(&body).unwrap();
        }
        body.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
            .find(|message| message["id"] == json!(id))
            .unwrap_or_else(|| panic!("{method}: no answer in {body}"))
    }
}

/// The error message of an answer that must be "no such task".
fn unknown_task(answer: &Value, task: &str) {
    assert_eq!(answer["error"]["code"], -32602, "{answer:#}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("no task {task}")), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_in_the_2025_11_25_form_over_streamable_http() {
    let started = Instant::now();
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let (mut a, init) = Session::open(&front.base).await;
    assert!(a.id.is_some(), "initialize opened a session");
    assert_tasks_capability(&init);
    assert!(
        init["capabilities"]["tools"].is_object(),
        "rmcp's own: {init:#}"
    );
    assert_task_support(&mut a).await;

    // A long task takes the host's one slot.
    let long = json!({"tokens": 200, "token_interval_ms": 50});
    let created = create_task(&mut a, as_task(call("running", long))).await;
    let running = created["task"]["taskId"].as_str().unwrap().to_string();
    wait_generating(&mut a, &running).await;
    let (ids, listed) = listed_ids(&mut a).await;
    assert_eq!(ids, [running.as_str()], "{listed:#}");

    // Another session: the task is not there for it, in any way.
    let (mut b, _) = Session::open(&front.base).await;
    assert_ne!(a.id, b.id);
    unknown_task(
        &b.request("tasks/get", json!({"taskId": running})).await,
        &running,
    );
    unknown_task(
        &b.request("tasks/cancel", json!({"taskId": running})).await,
        &running,
    );
    unknown_task(
        &b.request("tasks/result", json!({"taskId": running})).await,
        &running,
    );
    assert_eq!(
        b.result("tasks/list", json!({})).await,
        json!({"tasks": []})
    );
    let still = a.result("tasks/get", json!({"taskId": running})).await;
    assert_eq!(still["status"], "working", "{still:#}");

    // Cancelled by its own session: off the host.
    let cancelled = a.result("tasks/cancel", json!({"taskId": running})).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");
    assert_cancel_again_refused(&mut a, &running).await;

    // A later task runs (the slot came back), and its result is a plain call's.
    assert_later_task_is_a_plain_call(&mut a).await;

    let seen = outcomes(&fleet.chat_records(0));
    assert_eq!(
        seen,
        [
            ("running".to_string(), Outcome::ClientDisconnected),
            ("after".to_string(), Outcome::Completed),
            ("plain".to_string(), Outcome::Completed),
        ],
        "the running task was stopped on the host"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(front);
    fleet.shutdown().await;
}
