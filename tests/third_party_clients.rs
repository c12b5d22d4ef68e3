//! Software nobody on this project wrote, against the daemon: the official Python `mcp` SDK
//! (Streamable HTTP in both protocol generations, and stdio) and the official `openai` package.
//!
//! `.ci/run` installs both into a cached virtualenv and sets `PRIX_PYTHON`; without it these
//! tests fail with instructions rather than skip.

mod common;

use std::path::PathBuf;

use common::clients::script;
use common::{Fleet, HttpFront, host};
use prix_dispatch::sim::{Behaviour, ToolCallSpec};

async fn fleet() -> Fleet {
    let tool = Behaviour {
        tokens: 0,
        tool_call: Some(ToolCallSpec {
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
            fragments: 4,
        }),
        ..Behaviour::default()
    };
    let chat = Behaviour {
        tokens: 3,
        token_interval_ms: 5,
        ..Behaviour::default()
    };
    Fleet::start(vec![
        host(&["chat-model", "tool-model"])
            .behaviour(chat)
            .sim(|c| {
                c.per_model.insert("tool-model".into(), tool);
            }),
    ])
    .await
}

/// Runs a client script to completion off the runtime (the daemon keeps serving meanwhile).
async fn run(args: Vec<String>) {
    let python = common::clients::python("Python with the `mcp` and `openai` packages");
    let (stdout, _) = common::clients::run("python", python, args).await;
    assert!(stdout.contains(": ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_package_streams_text_and_tool_calls() {
    let fleet = fleet().await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let base = front.base.clone();
    run(vec![script("openai_client.py").display().to_string(), base]).await;
    assert_eq!(fleet.sims[0].stats().peak_in_flight, 1);
    // The SDK did not retry the host's 400 (two calls, stream and not): one request each.
    let vllm_400 = fleet
        .chat_records(0)
        .iter()
        .filter(|r| r.body.to_string().contains("BadRequestError"))
        .count();
    assert_eq!(vllm_400, 2, "the openai SDK retried a permanent error");
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mcp_sdk_over_http_in_both_protocol_generations() {
    let fleet = fleet().await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let base = front.base.clone();
    for mode in ["legacy", "2026-07-28"] {
        run(vec![
            script("mcp_client.py").display().to_string(),
            format!("{base}/mcp"),
            mode.into(),
        ])
        .await;
    }
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mcp_sdk_over_stdio_through_the_bridge() {
    // The stdio launch joins (and here starts) the machine's daemon, and relays to it.
    let fleet = fleet().await;
    let runtime = tempdir("py-runtime");
    let config = runtime.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nidle_exit_seconds = 1\nsocket = \"{}\"\n[[host]]\nname = \"gpu0\"\nurl = \"{}\"\n",
            runtime.join("daemon.sock").display(),
            fleet.sims[0].url()
        ),
    )
    .unwrap();
    // (The SDK gives the server a cleaned environment: the socket is in the config.)
    run(vec![
        script("mcp_client.py").display().to_string(),
        "stdio".into(),
        "auto".into(),
        env!("CARGO_BIN_EXE_prix-dispatch").into(),
        config.display().to_string(),
    ])
    .await;
    let log =
        std::fs::read_to_string(runtime.join("daemon.log")).expect("the bridge started a daemon");
    assert!(log.contains("stdio launches join at this socket"), "{log}");
    fleet.shutdown().await;
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prix-dispatch-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
