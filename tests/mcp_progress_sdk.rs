//! The test issue 13 names for item 4: a client whose timeout restarts on progress, with a
//! 5 s timeout, survives a 20 s wait in the queue and a 20 s model load. The client is the
//! official TypeScript SDK (the Python `mcp` SDK 2.3.0 has no reset-on-progress: its
//! `read_timeout_seconds` is one fixed clock, `mcp/shared/_request_clock.py`), run by Node
//! from the MCP Inspector install that `.ci/run` caches. A control call with the same timeout
//! and no reset must time out, so the 5 s are real.

mod common;

use std::time::Duration;

use common::{Fleet, HttpFront, host, spec};
use prix_dispatch::TaskEvent;
use prix_dispatch::sim::{ResidencyEventKind, sim_directive};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_with_a_5s_timeout_reset_on_progress_survives_a_20s_queue_and_a_20s_load() {
    let fleet = Fleet::start_tuned(
        vec![host(&["m", "n"]).sim(|c| c.max_loaded_models = Some(1))],
        |c| c.server.progress_interval = Duration::from_secs(1),
    )
    .await;
    // The host's one slot is taken for 20 s by a call for another model.
    let mut blocker = fleet
        .dispatcher
        .submit(spec(
            "m",
            &sim_directive(json!({"ttft_ms": 20000, "tokens": 1})),
            json!({"timeout_seconds": 60}),
        ))
        .unwrap();
    while !matches!(blocker.next().await, Some(TaskEvent::Started { .. })) {}
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;

    let report =
        common::clients::node_report("ts_progress_client.mjs", [format!("{}/mcp", front.base)])
            .await;

    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["text"], "tok0 tok1 ", "{report:#}");
    assert!(
        report["elapsed_ms"].as_u64().unwrap() > 38_000,
        "{report:#}"
    );
    assert!(
        report["widest_gap_ms"].as_u64().unwrap() < 5_000,
        "{report:#}"
    );
    assert!(
        report["control"]
            .as_str()
            .unwrap()
            .starts_with("error -32001"),
        "the control call without reset timed out: {report:#}"
    );
    let messages: Vec<&str> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("queued for n: position 1")),
        "{messages:?}"
    );
    assert!(messages.contains(&"loading n on gpu0"), "{messages:?}");

    // What the host saw: the blocker, then the call for n after it (never both at once); the
    // control call was cancelled in the queue and never reached it; n was loaded for 20 s.
    let records = fleet.chat_records(0);
    let models: Vec<&str> = records.iter().filter_map(|r| r.model.as_deref()).collect();
    assert_eq!(models, ["m", "n"], "{records:#?}");
    common::assert_host_invariants(&records, 1);
    let loads: Vec<(String, u64)> = fleet.sims[0]
        .residency_events()
        .into_iter()
        .filter(|e| e.kind == ResidencyEventKind::Load && e.model == "n")
        .map(|e| (e.model, e.duration_ms))
        .collect();
    assert_eq!(loads, [("n".to_string(), 20_000)]);
    assert_eq!(fleet.status().await.counters.cancelled, 1);
    drop((front, blocker));
    fleet.shutdown().await;
}
