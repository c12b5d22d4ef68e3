//! MCP tasks in the 2025-11-25 experimental form: the calls, the comparisons and the raw
//! JSON-RPC checks that hold the same over stdio and over Streamable HTTP.

use std::time::{Duration, Instant};

use prix_dispatch::sim::{Outcome, RequestRecord, sim_directive};
use serde_json::{Value, json};

/// A bare JSON-RPC client of one MCP session (over stdio or over HTTP).
#[allow(async_fn_in_trait)]
pub trait JsonRpc {
    /// Sends a request; returns its whole answer (`result` or `error`).
    async fn request(&mut self, method: &str, params: Value) -> Value;

    /// Sends a request; asserts its answer is not an error and returns its `result`.
    async fn result(&mut self, method: &str, params: Value) -> Value {
        let answer = self.request(method, params).await;
        assert!(answer.get("error").is_none(), "{method}: {answer:#}");
        answer["result"].clone()
    }
}

/// A `tools/call` of `complete` for model `m` whose message is the sim `directive` followed by
/// `label` (the last word, which [`label`] reads back from the host's records).
pub fn call(label: &str, directive: Value) -> Value {
    json!({
        "name": "complete",
        "arguments": {
            "model_id": "m",
            "messages": [{"role": "user", "content": format!("{} {label}", sim_directive(directive))}],
        },
    })
}

/// `call` asking to run as a task with a 60 s ttl.
pub fn as_task(mut call: Value) -> Value {
    call["task"] = json!({"ttl": 60000});
    call
}

/// The label of the request the host recorded: the last word of its first message.
pub fn label(record: &RequestRecord) -> String {
    let content = record.body["messages"][0]["content"].as_str().unwrap_or("");
    content.rsplit(' ').next().unwrap_or("").to_string()
}

/// Each request the host recorded, in order, as its [`label`] and outcome.
pub fn outcomes(records: &[RequestRecord]) -> Vec<(String, Outcome)> {
    records.iter().map(|r| (label(r), r.outcome)).collect()
}

/// A tool result without what is timing of one run (`latency_ms`, `ttft_ms`,
/// `queue_wait_ms` in `structuredContent`) and without `_meta`.
pub fn stable(result: &Value) -> Value {
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

/// Asserts the report of `tests/clients/ts_tasks_client.mjs`: the ~6 s call ran as a task
/// under the 3 s timeout (ok, over 5 s, `taskCreated` first and `result` last, a status
/// saying `m is generating on gpu0`, the last one `completed`), the control call without a
/// task timed out, and the task's result (30 tokens) equals the plain call's, timings aside.
pub fn assert_ts_tasks_report(report: &Value) {
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
}

/// Asserts the `initialize` result declares the `tasks` capability (list, cancel, and task
/// `tools/call`).
pub fn assert_tasks_capability(init: &Value) {
    assert_eq!(
        init["capabilities"]["tasks"],
        json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}),
        "{init:#}"
    );
}

/// Asserts from `tools/list` that `complete` and `complete_stream` have `taskSupport`
/// `optional` and no other tool has any.
pub async fn assert_task_support(rpc: &mut impl JsonRpc) {
    let tools = rpc.result("tools/list", json!({})).await;
    for tool in tools["tools"].as_array().unwrap() {
        let support = &tool["execution"]["taskSupport"];
        match tool["name"].as_str().unwrap() {
            "complete" | "complete_stream" => assert_eq!(support, "optional"),
            _ => assert!(support.is_null(), "{tool:#}"),
        }
    }
}

/// Sends `task_call` (a [`call`] made [`as_task`]); asserts it is answered with a task that
/// is `working`, has the asked 60 s ttl and a 1 s poll interval. Returns the whole result.
pub async fn create_task(rpc: &mut impl JsonRpc, task_call: Value) -> Value {
    let created = rpc.result("tools/call", task_call).await;
    let task = &created["task"];
    assert_eq!(task["status"], "working", "{created:#}");
    assert_eq!(task["ttl"], 60000);
    assert_eq!(task["pollInterval"], 1000);
    created
}

/// Polls `tasks/get` of `task` every 100 ms until its status message says it `is generating
/// on gpu0`; fails with the last answer after 5 s.
pub async fn wait_generating(rpc: &mut impl JsonRpc, task: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = rpc.result("tasks/get", json!({"taskId": task})).await;
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
}

/// The ids `tasks/list` returns, in order, with the whole answer for messages.
pub async fn listed_ids(rpc: &mut impl JsonRpc) -> (Vec<String>, Value) {
    let listed = rpc.result("tasks/list", json!({})).await;
    let ids = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["taskId"].as_str().unwrap().to_string())
        .collect();
    (ids, listed)
}

/// Asserts that a second `tasks/cancel` of the cancelled `task` is an error saying it has
/// already ended (cancelled); returns that answer.
pub async fn assert_cancel_again_refused(rpc: &mut impl JsonRpc, task: &str) -> Value {
    let again = rpc.request("tasks/cancel", json!({"taskId": task})).await;
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has already ended (cancelled)"),
        "{again:#}"
    );
    again
}

/// Runs a quick task labelled `after` and a plain call labelled `plain` (3 tokens each);
/// asserts the task's `tasks/result` names it in `_meta` as related task, `tasks/get` says
/// `completed`, the plain call's text is `tok0 tok1 tok2 ` and both results are equal,
/// timings aside.
pub async fn assert_later_task_is_a_plain_call(rpc: &mut impl JsonRpc) {
    let quick = json!({"tokens": 3, "token_interval_ms": 20});
    let after = rpc
        .result("tools/call", as_task(call("after", quick.clone())))
        .await["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let from_task = rpc.result("tasks/result", json!({"taskId": after})).await;
    assert_eq!(
        from_task["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        json!(after)
    );
    let done = rpc.result("tasks/get", json!({"taskId": after})).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let plain = rpc.result("tools/call", call("plain", quick)).await;
    assert_eq!(plain["structuredContent"]["text"], "tok0 tok1 tok2 ");
    assert_eq!(stable(&from_task), stable(&plain));
}
