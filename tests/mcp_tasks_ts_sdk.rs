//! The TypeScript SDK runs a call longer than its fixed request timeout as an MCP task in
//! the 2025-11-25 experimental form: `client.experimental.tasks.callToolStream` with a 3 s
//! timeout through a ~6 s completion over stdio, against the built `prix-dispatch stdio
//! --standalone` and a simulated host. The task's result equals a plain call's; a plain call
//! with the same 3 s timeout times out, so the 3 s are real. The SDK is the one bundled with
//! the MCP Inspector that `.ci/run` caches, run by Node (tests/clients/ts_tasks_client.mjs).

mod common;

use std::path::PathBuf;
use std::process::Command;

use prix_dispatch::sim::{SimConfig, SimHost};
use serde_json::Value;

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
async fn typescript_sdk_runs_a_6s_call_as_a_task_under_a_3s_timeout() {
    let sim = SimHost::start(SimConfig {
        models: vec!["m".into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let config = std::env::temp_dir().join(format!(
        "prix-dispatch-test-{}-ts-tasks.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        format!("[[host]]\nname = \"gpu0\"\nurl = \"{}/v1\"\n", sim.url()),
    )
    .unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ts_tasks_client.mjs");
    let args = vec![
        script.display().to_string(),
        sdk_dir().display().to_string(),
        env!("CARGO_BIN_EXE_prix-dispatch").to_string(),
        config.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || Command::new("node").args(&args).output())
        .await
        .unwrap()
        .expect("node runs");
    let _ = std::fs::remove_file(&config);
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
}
