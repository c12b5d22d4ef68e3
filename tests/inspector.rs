//! The MCP Inspector CLI (npm `@modelcontextprotocol/inspector`, installed by `.ci/run` into a
//! cache outside the repo) against the daemon: `tools/list` and `tools/call`, over stdio (through
//! the bridge to the machine's daemon) and over Streamable HTTP.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Fleet, HttpFront, host, quick};
use serde_json::Value;

fn inspector() -> PathBuf {
    common::installed(
        "PRIX_INSPECTOR",
        "inspector/node_modules/.bin/mcp-inspector",
        "MCP Inspector CLI",
    )
}

async fn inspect(args: Vec<String>) -> Output {
    let bin = inspector();
    tokio::task::spawn_blocking(move || Command::new(bin).arg("--cli").args(&args).output())
        .await
        .unwrap()
        .expect("the inspector runs")
}

fn json_of(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn tool_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

const TOOLS: [&str; 4] = [
    "complete",
    "complete_stream",
    "dispatch_status",
    "list_models",
];

fn call_args() -> Vec<String> {
    [
        "--method",
        "tools/call",
        "--tool-name",
        "complete",
        "--tool-arg",
        "model_id=m",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "--tool-arg".into(),
        r#"messages=[{"role":"user","content":"hi"}]"#.into(),
    ])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_over_stdio_through_the_bridge() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(3, 1))]).await;
    let dir = std::env::temp_dir().join(format!("prix-dispatch-inspector-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nidle_exit_seconds = 1\nsocket = \"{}\"\n[[host]]\nname = \"gpu0\"\nurl = \"{}\"\n",
            dir.join("daemon.sock").display(),
            fleet.sims[0].url()
        ),
    )
    .unwrap();
    // The inspector takes --config for itself: the configuration goes by environment.
    let launch = |rest: Vec<String>| {
        let mut args = vec![
            "-e".to_string(),
            format!("PRIX_DISPATCH_CONFIG={}", config.display()),
            env!("CARGO_BIN_EXE_prix-dispatch").to_string(),
            "stdio".into(),
        ];
        args.extend(rest);
        args
    };
    let list = inspect(launch(vec!["--method".into(), "tools/list".into()])).await;
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(tool_names(&json_of(&list)), TOOLS);

    let called = inspect(launch(call_args())).await;
    assert!(
        called.status.success(),
        "{}",
        String::from_utf8_lossy(&called.stderr)
    );
    let result = json_of(&called);
    assert_eq!(result["content"][0]["text"], "tok0 tok1 tok2 ");
    assert_eq!(result["structuredContent"]["host"], "gpu0");
    assert_eq!(fleet.chat_records(0).len(), 1);
    let _ = std::fs::remove_dir_all(dir);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_over_streamable_http() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(3, 1))]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let url = format!("{}/mcp", front.base);
    let with_url = |rest: Vec<String>| {
        let mut args = vec![url.clone(), "--transport".into(), "http".into()];
        args.extend(rest);
        args
    };
    let list = inspect(with_url(vec!["--method".into(), "tools/list".into()])).await;
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(tool_names(&json_of(&list)), TOOLS);

    let called = inspect(with_url(call_args())).await;
    assert!(
        called.status.success(),
        "{}",
        String::from_utf8_lossy(&called.stderr)
    );
    assert_eq!(json_of(&called)["content"][0]["text"], "tok0 tok1 tok2 ");
    drop(front);
    fleet.shutdown().await;
}
