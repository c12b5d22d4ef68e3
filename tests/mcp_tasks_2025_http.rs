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

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Fleet, HttpFront, host};
use prix_dispatch::sim::{Outcome, RequestRecord, sim_directive};
use serde_json::{Value, json};

/// The SDK package inside the Inspector's install.
fn sdk_dir() -> PathBuf {
    let inspector = common::installed(
        "PRIX_INSPECTOR",
        "inspector/node_modules/.bin/mcp-inspector",
        "MCP Inspector CLI (it bundles the TypeScript SDK)",
    );
    let node_modules = inspector
        .parent()
        .and_then(|bin| bin.parent())
        .expect("the Inspector's bin is inside node_modules/.bin");
    node_modules.join("@modelcontextprotocol/sdk")
}

/// `structuredContent` without the fields that are timings of one run.
fn stable(result: &Value) -> Value {
    let mut result = result.clone();
    if let Some(data) = result["structuredContent"].as_object_mut() {
        for timing in ["latency_ms", "ttft_ms", "queue_wait_ms"] {
            data.remove(timing);
        }
    }
    if let Some(object) = result.as_object_mut() {
        object.remove("_meta");
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_over_http_runs_a_6s_call_as_a_task_under_a_3s_timeout() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ts_tasks_client.mjs");
    let args = vec![
        script.display().to_string(),
        sdk_dir().display().to_string(),
        format!("{}/mcp", front.base),
    ];
    let output = tokio::task::spawn_blocking(move || Command::new("node").args(&args).output())
        .await
        .unwrap()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"));

    assert_eq!(report["ok"], true, "{report:#}");
    assert!(
        report["elapsed_ms"].as_u64().unwrap() > 5_000,
        "the call outlasted the timeout: {report:#}"
    );
    let messages = report["messages"].as_array().unwrap();
    assert_eq!(messages.first().unwrap(), "taskCreated", "{report:#}");
    assert_eq!(messages.last().unwrap(), "result", "{report:#}");
    let statuses: Vec<&str> = report["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("m is generating on gpu0")),
        "{statuses:?}"
    );
    assert!(
        statuses.last().unwrap().starts_with("completed"),
        "{statuses:?}"
    );
    assert!(
        report["control"]
            .as_str()
            .unwrap()
            .contains("Request timed out"),
        "{report:#}"
    );
    assert_eq!(
        report["task_result"]["structuredContent"]["text"]
            .as_str()
            .unwrap()
            .matches("tok")
            .count(),
        30
    );
    assert_eq!(
        stable(&report["task_result"]),
        stable(&report["plain_result"]),
        "{report:#}"
    );
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

    async fn result(&mut self, method: &str, params: Value) -> Value {
        let answer = self.request(method, params).await;
        assert!(answer.get("error").is_none(), "{method}: {answer:#}");
        answer["result"].clone()
    }
}

fn call(label: &str, directive: Value) -> Value {
    json!({
        "name": "complete",
        "arguments": {
            "model_id": "m",
            "messages": [{"role": "user", "content": format!("{} {label}", sim_directive(directive))}],
        },
    })
}

fn as_task(mut call: Value) -> Value {
    call["task"] = json!({"ttl": 60000});
    call
}

fn label(record: &RequestRecord) -> String {
    let content = record.body["messages"][0]["content"].as_str().unwrap_or("");
    content.rsplit(' ').next().unwrap_or("").to_string()
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
    assert_eq!(
        init["capabilities"]["tasks"],
        json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}),
        "{init:#}"
    );
    assert!(
        init["capabilities"]["tools"].is_object(),
        "rmcp's own: {init:#}"
    );
    let tools = a.result("tools/list", json!({})).await;
    for tool in tools["tools"].as_array().unwrap() {
        let support = &tool["execution"]["taskSupport"];
        match tool["name"].as_str().unwrap() {
            "complete" | "complete_stream" => assert_eq!(support, "optional"),
            _ => assert!(support.is_null(), "{tool:#}"),
        }
    }

    // A long task takes the host's one slot.
    let long = json!({"tokens": 200, "token_interval_ms": 50});
    let created = a.result("tools/call", as_task(call("running", long))).await;
    let task = &created["task"];
    assert_eq!(task["status"], "working", "{created:#}");
    assert_eq!(task["ttl"], 60000);
    assert_eq!(task["pollInterval"], 1000);
    let running = task["taskId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = a.result("tasks/get", json!({"taskId": running})).await;
        if got["statusMessage"]
            .as_str()
            .unwrap()
            .contains("is generating on gpu0")
        {
            break;
        }
        assert!(Instant::now() < deadline, "never generating: {got:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = a.result("tasks/list", json!({})).await;
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["taskId"].as_str().unwrap())
        .collect();
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
    let again = a.request("tasks/cancel", json!({"taskId": running})).await;
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has already ended (cancelled)"),
        "{again:#}"
    );

    // A later task runs (the slot came back), and its result is a plain call's.
    let quick = json!({"tokens": 3, "token_interval_ms": 20});
    let after = a
        .result("tools/call", as_task(call("after", quick.clone())))
        .await["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let from_task = a.result("tasks/result", json!({"taskId": after})).await;
    assert_eq!(
        from_task["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        json!(after)
    );
    let done = a.result("tasks/get", json!({"taskId": after})).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let plain = a.result("tools/call", call("plain", quick)).await;
    assert_eq!(plain["structuredContent"]["text"], "tok0 tok1 tok2 ");
    assert_eq!(stable(&from_task), stable(&plain));

    let seen: Vec<(String, Outcome)> = fleet
        .chat_records(0)
        .iter()
        .map(|r| (label(r), r.outcome))
        .collect();
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
