//! MCP tasks in the 2025-11-25 experimental form, raw JSON-RPC over the stdio of the built
//! `prix-dispatch stdio --standalone` against a simulated one-slot host: `tools/call` with
//! `task: {ttl}` answered at once with a task; `tasks/get` shows the queued phase, then the
//! running one; `tasks/list` lists them; `tasks/cancel` of a queued and of a running task
//! (the host's records show the running request stopped, the queued one never sent, and a
//! later call still runs: the slot came back); `tasks/result` of a completed task equals a
//! plain call's result; an unknown task id and a bad ttl are JSON-RPC errors that say why.

mod common;

use std::time::{Duration, Instant};

use common::clients::TempConfig;
use common::tasks::{
    JsonRpc, as_task, assert_cancel_again_refused, assert_later_task_is_a_plain_call,
    assert_task_support, assert_tasks_capability, call, create_task, listed_ids, outcomes, stable,
    wait_generating,
};
use prix_dispatch::sim::{Outcome, SimConfig, SimHost};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A bare JSON-RPC client on the daemon's stdin/stdout.
struct Raw {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    next_id: u64,
    _config: TempConfig,
}

impl Raw {
    async fn spawn(sim: &SimHost) -> Raw {
        // One file per launch: the tests of this file run at once, each with its own host.
        let config = TempConfig::one_host(sim, "tasks-2025");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch"))
            .arg("stdio")
            .arg("--standalone")
            .arg("--config")
            .arg(&config.0)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Raw {
            _child: child,
            stdin,
            lines,
            next_id: 0,
            _config: config,
        }
    }

    async fn send(&mut self, message: Value) {
        self.stdin
            .write_all(format!("{message}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }
}

impl JsonRpc for Raw {
    /// Sends a request and returns its whole answer (notifications in between are skipped).
    async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(15), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .unwrap()
                .expect("the daemon closed stdout");
            let message: Value = serde_json::from_str(&line).expect("stdout carries JSON only");
            if message["id"] == json!(id) {
                return message;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_in_the_2025_11_25_form_over_stdio() {
    let started = Instant::now();
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let mut raw = Raw::spawn(&sim).await;
    let init = raw
        .result(
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw-tasks", "version": "1"}}),
        )
        .await;
    assert_tasks_capability(&init);
    raw.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    assert_task_support(&mut raw).await;

    // A long call takes the host's one slot; a second one waits in the queue.
    let long = json!({"tokens": 200, "token_interval_ms": 50});
    let created = create_task(&mut raw, as_task(call("running", long.clone()))).await;
    let task = &created["task"];
    for field in ["createdAt", "lastUpdatedAt", "statusMessage"] {
        assert!(task[field].is_string(), "{field}: {created:#}");
    }
    let running = task["taskId"].as_str().unwrap().to_string();
    wait_generating(&mut raw, &running).await;
    let queued = raw
        .result("tools/call", as_task(call("queued", long)))
        .await["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = raw.result("tasks/get", json!({"taskId": queued})).await;
    assert_eq!(got["status"], "working");
    assert!(
        got["statusMessage"]
            .as_str()
            .unwrap()
            .starts_with("queued for m: position 1"),
        "{got:#}"
    );

    let (ids, listed) = listed_ids(&mut raw).await;
    assert_eq!(ids, [running.as_str(), queued.as_str()], "{listed:#}");

    // Cancelled where they are: out of the queue, off the host.
    for id in [&queued, &running] {
        let cancelled = raw.result("tasks/cancel", json!({"taskId": id})).await;
        assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");
        assert_eq!(cancelled["taskId"], json!(id));
    }
    let again = assert_cancel_again_refused(&mut raw, &running).await;
    assert_eq!(again["error"]["code"], -32602, "{again:#}");
    let no_result = raw.request("tasks/result", json!({"taskId": queued})).await;
    assert!(
        no_result["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was cancelled"),
        "{no_result:#}"
    );

    // A later task runs (the slot came back) and its result is a plain call's.
    assert_later_task_is_a_plain_call(&mut raw).await;

    // A tool error is a failed task whose result is the plain call's isError result.
    let mut unknown_model = call("nobody", json!({"tokens": 1}));
    unknown_model["arguments"]["model_id"] = json!("no-such-model");
    let failed = raw
        .result("tools/call", as_task(unknown_model.clone()))
        .await["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let failed_result = raw.result("tasks/result", json!({"taskId": failed})).await;
    assert_eq!(failed_result["isError"], true, "{failed_result:#}");
    let got = raw.result("tasks/get", json!({"taskId": failed})).await;
    assert_eq!(got["status"], "failed", "{got:#}");
    let plain_failure = raw.result("tools/call", unknown_model).await;
    assert_eq!(stable(&failed_result), stable(&plain_failure));

    // Errors that say what failed and what to do.
    let unknown = raw
        .request("tasks/get", json!({"taskId": "no-such-task"}))
        .await;
    assert_eq!(unknown["error"]["code"], -32602, "{unknown:#}");
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(message.contains("no task no-such-task"), "{message}");
    assert!(message.contains("start the call again"), "{message}");
    let mut bad_ttl = call("x", json!({"tokens": 1}));
    bad_ttl["task"] = json!({"ttl": "an hour"});
    let bad = raw.request("tools/call", bad_ttl).await;
    assert_eq!(bad["error"]["code"], -32602, "{bad:#}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl must be a number of milliseconds"),
        "{bad:#}"
    );

    let seen = outcomes(&sim.chat_records());
    assert_eq!(
        seen,
        [
            ("running".to_string(), Outcome::ClientDisconnected),
            ("after".to_string(), Outcome::Completed),
            ("plain".to_string(), Outcome::Completed),
        ],
        "the queued task never reached the host; the running one was stopped"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A line on stdin that is not JSON gets JSON-RPC's -32700 answer (id null) saying what was
/// wrong and that each line must be one message; a blank line gets nothing; the session goes
/// on, and stdout carries nothing else.
#[tokio::test]
async fn a_line_that_is_not_json_is_answered_with_a_parse_error() {
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let mut raw = Raw::spawn(&sim).await;
    raw.result(
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "t", "version": "1"}}),
    )
    .await;
    raw.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    raw.stdin.write_all(b"\nthis is not json\n").await.unwrap();
    raw.stdin.flush().await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(15), raw.lines.next_line())
        .await
        .expect("an answer to the bad line")
        .unwrap()
        .unwrap();
    let answer: Value = serde_json::from_str(&line).expect("stdout carries JSON only");
    assert_eq!(answer["jsonrpc"], "2.0");
    assert_eq!(answer["id"], Value::Null);
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("not JSON")
            && message.contains("each line must be exactly one JSON-RPC message"),
        "{message}"
    );
    // The session goes on: the next request is answered, and was the next line.
    let tools = raw.request("tools/list", json!({})).await;
    assert!(tools["result"]["tools"].is_array(), "{tools}");
}
