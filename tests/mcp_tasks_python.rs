//! MCP tasks (SEP-2663 `io.modelcontextprotocol/tasks`) with the official Python `mcp` SDK, on
//! its client extension API (`tests/clients/mcp_tasks_client.py`), over Streamable HTTP in the
//! 2026-07-28 protocol: a call longer than the client's fixed 3 s timeout completes as a task
//! (the same call without tasks times out); a running and a queued task are cancelled; the
//! host's records show the running request stopped, the queued one never sent, and the slot
//! back in use afterwards.

mod common;

use common::tasks::outcomes;
use common::{Fleet, HttpFront, host};
use prix_dispatch::sim::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_runs_long_calls_as_tasks_and_cancels_them_anywhere() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let python = common::clients::python("Python with the `mcp` package");
    let script = common::clients::script("mcp_tasks_client.py");
    let url = format!("{}/mcp", front.base);
    let report =
        common::clients::run_for_report("python", python, vec![script.display().to_string(), url])
            .await;

    assert!(
        report["control"].as_str().unwrap().contains("timed out"),
        "{report:#}"
    );
    let long = &report["long"];
    assert_eq!(long["is_error"], false, "{report:#}");
    assert_eq!(long["text"], "tok0 tok1 ", "{report:#}");
    assert!(long["seconds"].as_f64().unwrap() > 5.0, "{report:#}");
    assert_eq!(long["created_status"], "working");
    // The structured result is a plain call's.
    let structured = &long["structured"];
    for key in [
        "text",
        "finish_reason",
        "usage",
        "latency_ms",
        "queue_wait_ms",
        "host",
        "model",
    ] {
        assert!(structured.get(key).is_some(), "{key} missing: {structured}");
    }
    assert_eq!(structured["host"], "gpu0");
    assert!(
        long["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("running m on gpu0")),
        "{report:#}"
    );

    let before = &report["before_cancel"];
    assert!(
        before["running"]
            .as_str()
            .unwrap()
            .starts_with("running m on gpu0"),
        "{report:#}"
    );
    assert!(
        before["queued"]
            .as_str()
            .unwrap()
            .starts_with("queued for m: position 1"),
        "{report:#}"
    );
    assert_eq!(report["after_cancel"]["queued"], "cancelled");
    assert_eq!(report["after_cancel"]["running"], "cancelled");
    assert!(
        report["cancel_again"]
            .as_str()
            .unwrap()
            .contains("has already ended (cancelled)"),
        "{report:#}"
    );
    assert!(
        report["unknown"]
            .as_str()
            .unwrap()
            .contains("no task no-such-task"),
        "{report:#}"
    );
    assert_eq!(report["after"], "tok0 ");

    // What the host saw, request by request (labelled by the text after each directive).
    let records = fleet.chat_records(0);
    let seen = outcomes(&records);
    assert_eq!(
        seen,
        [
            ("control".to_string(), Outcome::ClientDisconnected),
            ("long".to_string(), Outcome::Completed),
            ("running".to_string(), Outcome::ClientDisconnected),
            ("after".to_string(), Outcome::Completed),
        ],
        "the queued task never reached the host; the running one was stopped"
    );
    common::assert_host_invariants(&records, 1);
    fleet
        .assert_all_slots_return(std::time::Duration::from_secs(5))
        .await;
    drop(front);
    fleet.shutdown().await;
}
