//! A `stdio` launch that cannot start answers its client's `initialize` with the reason (an MCP
//! client otherwise sees only "connection closed"), then exits non-zero.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn first_answer(args: &[&str]) -> (Value, std::process::ExitStatus) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch"))
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let initialize = json!({"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{initialize}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("answered in time")
        .unwrap()
        .expect("one line");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    (serde_json::from_str(&line).unwrap(), status)
}

#[tokio::test]
async fn a_missing_config_file_is_the_answer_to_initialize() {
    let (answer, status) = first_answer(&["stdio", "--config", "/nonexistent/fleet.toml"]).await;
    assert_eq!(answer["id"], 7);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/nonexistent/fleet.toml") && message.contains("cannot start"),
        "{message}"
    );
    assert!(!status.success());
}

#[tokio::test]
async fn a_bad_connect_url_is_the_answer_to_initialize() {
    let (answer, status) = first_answer(&["stdio", "--connect", "ftp://gpu-box:8765"]).await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("ftp://gpu-box:8765"), "{message}");
    assert!(!status.success());
}
