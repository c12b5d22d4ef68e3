//! End to end: the built `prix-dispatch stdio --standalone` binary (the queue in-process)
//! driven by rmcp's MCP client, against a simulated host: tool listing, streaming with progress, error results, cancellation by
//! `notifications/cancelled`, and by the client closing stdin.

use std::sync::Arc;
use std::time::Duration;

use prix_dispatch::sim::{Outcome, SimConfig, SimHost, sim_directive};
use rmcp::ServiceExt;
use rmcp::handler::client::ClientHandler;
use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Clone, Default)]
struct Collector {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Collector {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().await.push(params);
    }
}

struct Session {
    client: RunningService<RoleClient, Collector>,
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    _config: TempConfig,
}

struct TempConfig(std::path::PathBuf);
impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn connect(sim: &SimHost, tag: &str) -> Session {
    let path = std::env::temp_dir().join(format!(
        "prix-dispatch-test-{}-{tag}.toml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        format!("[[host]]\nname = \"gpu0\"\nurl = \"{}/v1\"\n", sim.url()),
    )
    .unwrap();
    let command =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch")).configure(|c| {
            c.arg("stdio")
                .arg("--standalone")
                .arg("--config")
                .arg(&path)
                .env("RUST_LOG", "warn");
        });
    let collector = Collector::default();
    let progress = collector.progress.clone();
    let client = collector
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .expect("MCP handshake");
    Session {
        client,
        progress,
        _config: TempConfig(path),
    }
}

fn call(name: &str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_string()).with_arguments(args.as_object().unwrap().clone())
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

#[tokio::test]
async fn tools_progress_and_results_over_stdio() {
    let sim = SimHost::start(SimConfig {
        models: vec!["m".into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = connect(&sim, "progress").await;

    let tools = s.client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "complete",
            "complete_stream",
            "dispatch_status",
            "list_models"
        ]
    );
    let complete = tools.iter().find(|t| t.name == "complete_stream").unwrap();
    let schema = serde_json::to_value(&complete.input_schema).unwrap();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(required.contains(&"model_id") && required.contains(&"messages"));
    assert_eq!(schema["properties"]["temperature"]["default"], 0.7);
    assert_eq!(schema["properties"]["max_tokens"]["default"], 2048);

    let args = json!({
        "model_id": "m",
        "messages": [{"role": "user", "content": sim_directive(json!({"tokens": 6, "token_interval_ms": 20}))}],
    });
    let result = s
        .client
        .call_tool(call("complete_stream", args))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false));
    assert_eq!(text(&result), "tok0 tok1 tok2 tok3 tok4 tok5 ");
    let structured = result.structured_content.clone().unwrap();
    assert_eq!(structured["host"], "gpu0");
    assert_eq!(structured["finish_reason"], "stop");
    assert!(structured["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(structured["queue_wait_ms"].as_f64().is_some());

    tokio::time::sleep(Duration::from_millis(200)).await;
    let progress = s.progress.lock().await.clone();
    assert!(
        !progress.is_empty(),
        "progress notifications arrive for a call with a token"
    );
    let values: Vec<f64> = progress.iter().map(|p| p.progress).collect();
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "progress strictly increases: {values:?}"
    );
    let messages: Vec<String> = progress.iter().filter_map(|p| p.message.clone()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("running m on gpu0") || m == "loading m on gpu0"),
        "{messages:?}"
    );
    let deltas: String = messages
        .iter()
        .filter(|m| m.starts_with("tok"))
        .cloned()
        .collect();
    assert_eq!(
        deltas, "tok0 tok1 tok2 tok3 tok4 tok5 ",
        "every delta arrived as progress"
    );

    // Errors are tool results with isError, readable text, kind and retryable.
    let bad = s
        .client
        .call_tool(call(
            "complete",
            json!({"model_id": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ))
        .await
        .unwrap();
    assert_eq!(bad.is_error, Some(true));
    assert!(text(&bad).contains("Model 'nope' not available on any server"));
    let data = bad.structured_content.unwrap();
    assert_eq!(data["kind"], "model_not_available");
    assert_eq!(data["retryable"], false);

    let invalid = s
        .client
        .call_tool(call("complete", json!({"model_id": "m", "messages": []})))
        .await
        .unwrap();
    assert_eq!(invalid.is_error, Some(true));
    assert_eq!(
        invalid.structured_content.unwrap()["kind"],
        "invalid_request"
    );

    let models = s
        .client
        .call_tool(call("list_models", json!({})))
        .await
        .unwrap();
    let data = models.structured_content.unwrap();
    assert_eq!(data["models"], json!(["m"]));
    assert_eq!(data["unreachable"], json!([]));
    assert_eq!(data["hosts"][0]["name"], "gpu0");

    // Concurrent calls on one session share the one queue: one host, one slot, one at a time.
    let calls = (0..4).map(|i| {
        let args = json!({
            "model_id": "m",
            "messages": [{"role": "user", "content": sim_directive(json!({"tokens": 3, "token_interval_ms": 10}))}],
            "seed": i,
        });
        s.client.call_tool(call("complete", args))
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().is_error, Some(false));
    }
    assert_eq!(
        sim.stats().peak_in_flight,
        1,
        "two requests were on the one slot at once"
    );
    assert_eq!(sim.chat_records().len(), 5);

    s.client.cancel().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn cancellation_and_closed_stdin_stop_the_host() {
    let sim = SimHost::start(SimConfig {
        models: vec!["m".into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = connect(&sim, "cancel").await;
    let long = json!({
        "model_id": "m",
        "messages": [{"role": "user", "content": sim_directive(json!({"tokens": 200, "token_interval_ms": 20}))}],
    });

    // Abandoning the call sends notifications/cancelled: the host connection must drop.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        s.client.call_tool(call("complete_stream", long.clone())),
    )
    .await;
    assert!(abandoned.is_err(), "the call was still running");
    assert!(
        sim.wait_idle(Duration::from_secs(2)).await,
        "host still streaming after cancel"
    );
    assert_eq!(sim.chat_records()[0].outcome, Outcome::ClientDisconnected);
    // The slot returns once the settle time after a cancel has passed (src/worker.rs).
    let mut status = Value::Null;
    for _ in 0..100 {
        let answer = s
            .client
            .call_tool(call("dispatch_status", json!({})))
            .await
            .unwrap();
        status = answer.structured_content.unwrap();
        if status["hosts"][0]["active"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status["hosts"][0]["active"], 0);
    assert_eq!(status["counters"]["cancelled"], 1);

    // The session still works, and a client that closes stdin stops its work too.
    let peer = s.client.peer().clone();
    let running = tokio::spawn(async move { peer.call_tool(call("complete_stream", long)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.stats().in_flight, 1);
    s.client.cancel().await.unwrap();
    assert!(
        sim.wait_idle(Duration::from_secs(2)).await,
        "host still streaming after stdin closed"
    );
    let records = sim.chat_records();
    assert_eq!(
        records[1].outcome,
        Outcome::ClientDisconnected,
        "{records:#?}"
    );
    let _ = running.await;
    sim.shutdown().await;
}

/// The binary as a child we own (for signals, exit status and stderr), with an MCP client.
struct Owned {
    child: tokio::process::Child,
    client: RunningService<RoleClient, Collector>,
    stderr: tokio::task::JoinHandle<String>,
    _config: TempConfig,
}

async fn spawn_owned(config_text: String, tag: &str) -> Owned {
    use tokio::io::AsyncReadExt;
    let path = std::env::temp_dir().join(format!(
        "prix-dispatch-test-{}-{tag}.toml",
        std::process::id()
    ));
    std::fs::write(&path, config_text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch"))
        .arg("stdio")
        .arg("--standalone")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let client = Collector::default()
        .serve((stdout, stdin))
        .await
        .expect("MCP handshake");
    Owned {
        child,
        client,
        stderr,
        _config: TempConfig(path),
    }
}

fn signal(child: &tokio::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn fleet_config(sim: &SimHost, extra: &str) -> String {
    format!(
        "{extra}\n[[host]]\nname = \"gpu0\"\nurl = \"{}\"\n",
        sim.url()
    )
}

#[tokio::test]
async fn sigterm_lets_running_tasks_finish_and_refuses_queued_ones() {
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let mut owned = spawn_owned(
        fleet_config(&sim, "[server]\nshutdown_grace_seconds = 10"),
        "sigterm",
    )
    .await;
    let peer = owned.client.peer().clone();
    let args = |tokens: usize| json!({"model_id": "m", "messages": [{"role": "user", "content": sim_directive(json!({"tokens": tokens, "token_interval_ms": 30}))}]});
    let running = tokio::spawn({
        let peer = peer.clone();
        let a = args(20);
        async move { peer.call_tool(call("complete_stream", a)).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let queued = tokio::spawn({
        let a = args(1);
        async move { peer.call_tool(call("complete_stream", a)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&owned.child, "TERM");

    let done = running
        .await
        .unwrap()
        .expect("the running call gets its answer");
    assert_eq!(done.is_error, Some(false));
    assert_eq!(text(&done).split_whitespace().count(), 20);
    let refused = queued
        .await
        .unwrap()
        .expect("the queued call gets an answer");
    assert_eq!(refused.is_error, Some(true));
    assert!(text(&refused).contains("shutting down"));
    assert_eq!(refused.structured_content.unwrap()["retryable"], true);
    let status = tokio::time::timeout(Duration::from_secs(5), owned.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "graceful exit");
    assert_eq!(sim.chat_records().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let mut owned = spawn_owned(fleet_config(&sim, ""), "sigtwice").await;
    let peer = owned.client.peer().clone();
    let args = json!({"model_id": "m", "messages": [{"role": "user", "content": sim_directive(json!({"tokens": 500, "token_interval_ms": 20}))}]});
    let _running = tokio::spawn(async move { peer.call_tool(call("complete_stream", args)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&owned.child, "TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&owned.child, "INT");
    let at = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(3), owned.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(at.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Some(130));
    assert!(
        sim.wait_idle(Duration::from_secs(1)).await,
        "the host connection went with the process"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_keys_never_leak() {
    let sim = SimHost::start(SimConfig {
        models: vec!["m".into()],
        required_key: Some("host-secret-456".into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let config = format!(
        "[server]\nmax_request_bytes = 2000\n[[host]]\nname = \"gpu0\"\nurl = \"{}\"\napi_key = \"host-secret-456\"\n",
        sim.url()
    );
    let owned = spawn_owned(config, "badinput").await;
    let c = &owned.client;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"model_id": "m"}), "messages"),
        (json!({"model_id": "m", "messages": "hi"}), "invalid type"),
        (
            json!({"model_id": "m", "messages": []}),
            "at least one message",
        ),
        (
            json!({"model_id": "m", "messages": [{"content": "hi"}]}),
            "role",
        ),
        (
            json!({"model_id": "m", "messages": user, "max_tokens": 0}),
            "max_tokens must be at least 1",
        ),
        (
            json!({"model_id": "m", "messages": user, "temperature": 3}),
            "temperature must be between 0 and 2",
        ),
        (
            json!({"model_id": "m", "messages": user, "temperature": "hot"}),
            "invalid type",
        ),
        (
            json!({"model_id": "m", "messages": [{"role": "user", "content": "x".repeat(3000)}]}),
            "request too large",
        ),
        (
            json!({"model_id": "m", "messages": user, "api_key": "req-secret-123"}),
            "Authentication failed",
        ),
    ];
    for (args, needle) in cases {
        let r = c.call_tool(call("complete", args.clone())).await.unwrap();
        assert_eq!(r.is_error, Some(true), "{args}");
        let t = text(&r);
        assert!(t.contains(needle), "{needle:?} not in {t:?}");
        assert!(!t.contains("secret"), "a key leaked into an error: {t}");
    }
    // Unknown parameters are ignored, and the daemon still serves.
    let ok = c
        .call_tool(call(
            "complete",
            json!({"model_id": "m", "messages": user, "frobnicate": true}),
        ))
        .await
        .unwrap();
    assert_eq!(ok.is_error, Some(false));
    for tool in ["list_models", "dispatch_status"] {
        let r = c.call_tool(call(tool, json!({}))).await.unwrap();
        let all = format!("{}{}", text(&r), r.structured_content.unwrap());
        assert!(!all.contains("secret"), "{tool} shows a key: {all}");
    }
    // The host key went only to the host; the per-request key replaced it for that call.
    assert!(
        sim.records()
            .iter()
            .any(|r| r.auth.as_deref() == Some("Bearer req-secret-123"))
    );
    let Owned { client, stderr, .. } = owned;
    client.cancel().await.unwrap();
    let logs = stderr.await.unwrap();
    assert!(logs.contains("DEBUG"), "debug logging was on");
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains("secret")).collect();
    assert!(leaks.is_empty(), "a key leaked into the logs: {leaks:#?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn stdio_over_socket_pairs_as_node_launches_it() {
    // Node's child_process (Claude Code, Claude Desktop) gives a child Unix socket pairs for
    // stdin and stdout, not pipes; Python's subprocess gives pipes (the other tests).
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    let sim = SimHost::start(SimConfig::with_models(["m"])).await.unwrap();
    let path = std::env::temp_dir().join(format!(
        "prix-dispatch-test-{}-socketpair.toml",
        std::process::id()
    ));
    std::fs::write(&path, fleet_config(&sim, "")).unwrap();
    let (stdin_ours, stdin_theirs) = UnixStream::pair().unwrap();
    let (stdout_ours, stdout_theirs) = UnixStream::pair().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch"))
        .arg("stdio")
        .arg("--standalone")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(OwnedFd::from(stdin_theirs))
        .stdout(OwnedFd::from(stdout_theirs))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let to_child = {
        stdin_ours.set_nonblocking(true).unwrap();
        tokio::net::UnixStream::from_std(stdin_ours).unwrap()
    };
    let from_child = {
        stdout_ours.set_nonblocking(true).unwrap();
        tokio::net::UnixStream::from_std(stdout_ours).unwrap()
    };
    let client = ().serve((from_child, to_child)).await.expect("MCP handshake");
    let calls = (0..4).map(|i| {
        let args = json!({"model_id": "m", "messages": [{"role": "user", "content": format!("call {i}")}]});
        client.call_tool(call("complete_stream", args))
    });
    for result in futures::future::join_all(calls).await {
        let result = result.unwrap();
        assert_eq!(result.is_error, Some(false), "{result:?}");
        assert!(!text(&result).is_empty());
    }
    client.cancel().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("closing our end of stdin ends the process")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(sim.chat_records().len(), 4);
    let _ = std::fs::remove_file(&path);
    sim.shutdown().await;
}
