//! Answers the daemon writes on stdio itself (a -32700 for a line that is not JSON, task
//! requests) go between rmcp's lines, never inside one: a long answer of rmcp's that reaches
//! the layer in pieces stays whole while such answers are sent.

mod common;

use common::{Fleet, host};
use prix_dispatch::mcp::serve_client;
use prix_dispatch::sim::sim_directive;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_rmcp_answer_stays_whole_while_the_layer_answers_bad_lines() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (server_read, server_write) = tokio::io::split(server_end);
    let dispatcher = fleet.dispatcher.clone();
    let guard = dispatcher.clients().connect("test", None);
    tokio::spawn(serve_client(dispatcher, guard, server_read, server_write));
    let (read, mut write) = tokio::io::split(client_end);
    let mut lines = BufReader::new(read).lines();
    let send = |v: Value| format!("{v}\n");
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}});
    write.write_all(send(init).as_bytes()).await.unwrap();
    lines
        .next_line()
        .await
        .unwrap()
        .expect("initialize answered");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    write.write_all(send(initialized).as_bytes()).await.unwrap();
    // An answer of about 400 KB: 40,000 tokens of "tokN ".
    let content = sim_directive(json!({"tokens": 40000, "token_interval_ms": 0}));
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "complete", "arguments": {"model_id": "m", "max_tokens": 50000,
        "messages": [{"role": "user", "content": content}]}}});
    write.write_all(send(call).as_bytes()).await.unwrap();
    // Lines that are not JSON keep the layer answering while rmcp's answer streams out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if write.write_all(b"not json\n").await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            write
        }
    });
    let (mut parse_errors, mut result) = (0, None);
    while result.is_none() {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the session goes on");
        let message: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a line that is not one message ({e}): {:.200}", line));
        match message["id"].as_i64() {
            Some(1) => result = Some(message),
            _ => {
                assert_eq!(message["error"]["code"], -32700, "{message}");
                parse_errors += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = result.unwrap();
    let text = result["result"]["structuredContent"]["text"]
        .as_str()
        .unwrap();
    assert!(
        text.len() > 200_000,
        "the whole answer: {} bytes",
        text.len()
    );
    assert!(
        parse_errors > 0,
        "the layer answered while rmcp's answer was written"
    );
    drop(noise.await.unwrap());
    fleet.shutdown().await;
}
