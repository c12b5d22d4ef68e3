//! The TypeScript SDK runs a call longer than its fixed request timeout as an MCP task in
//! the 2025-11-25 experimental form: `client.experimental.tasks.callToolStream` with a 3 s
//! timeout through a ~6 s completion over stdio, against the built `prix-dispatch stdio
//! --standalone` and a simulated host. The task's result equals a plain call's; a plain call
//! with the same 3 s timeout times out, so the 3 s are real. The SDK is the one bundled with
//! the MCP Inspector that `.ci/run` caches, run by Node (tests/clients/ts_tasks_client.mjs).

mod common;

use common::clients::TempConfig;
use common::tasks::assert_ts_tasks_report;
use prix_dispatch::sim::{SimConfig, SimHost};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_runs_a_6s_call_as_a_task_under_a_3s_timeout() {
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let config = TempConfig::one_host(&sim, "ts-tasks");
    let report = common::clients::node_report(
        "ts_tasks_client.mjs",
        [
            env!("CARGO_BIN_EXE_prix-dispatch").to_string(),
            config.0.display().to_string(),
        ],
    )
    .await;
    drop(config);
    assert_ts_tasks_report(&report);
}
