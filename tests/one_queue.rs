//! One queue per machine: every `prix-dispatch stdio` launch joins the same daemon (starting
//! it if needed), so launches never send work to one GPU at once.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use prix_dispatch::sim::{Behaviour, Outcome, SimConfig, SimHost, sim_directive};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

struct Setup {
    dir: PathBuf,
    config: PathBuf,
    http: String,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for pid in daemons(&self.config) {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(tag: &str, sim: &SimHost, idle_exit: f64) -> Setup {
    let dir = std::env::temp_dir().join(format!("prix-dispatch-oneq-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    let config = dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nidle_exit_seconds = {idle_exit}\nsocket = \"{}\"\n\
             [[host]]\nname = \"gpu0\"\nurl = \"{}\"\nslots = 1\n",
            dir.join("daemon.sock").display(),
            sim.url()
        ),
    )
    .unwrap();
    Setup {
        dir,
        config,
        http: format!("http://127.0.0.1:{port}"),
    }
}

/// Pids of `serve` processes started for this configuration.
fn daemons(config: &Path) -> Vec<u32> {
    let needle = config.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "serve") && args.iter().any(|a| a == &needle)
        })
        .filter(|pid| {
            // A zombie is no daemon.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            !status.contains("State:\tZ")
        })
        .collect()
}

async fn launch(config: &Path) -> RunningService<RoleClient, ()> {
    let command =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch")).configure(|c| {
            c.arg("stdio")
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "warn");
        });
    ().serve(TokioChildProcess::new(command).unwrap())
        .await
        .expect("MCP handshake through the bridge")
}

fn call(name: &str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_string()).with_arguments(args.as_object().unwrap().clone())
}

fn completion(tokens: usize, interval_ms: u64) -> CallToolRequestParams {
    call(
        "complete_stream",
        json!({"model_id": "m", "messages": [{"role": "user",
            "content": sim_directive(json!({"tokens": tokens, "token_interval_ms": interval_ms}))}]}),
    )
}

fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

async fn sim() -> SimHost {
    SimHost::start(SimConfig {
        models: vec!["m".into()],
        default: Behaviour {
            tokens: 4,
            token_interval_ms: 10,
            ..Behaviour::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_launches_and_an_openai_client_share_one_queue() {
    let sim = sim().await;
    let s = setup("share", &sim, 30.0);
    // Three launches at the same instant: exactly one daemon comes out of it.
    let (a, b, c) = tokio::join!(launch(&s.config), launch(&s.config), launch(&s.config));
    assert_eq!(daemons(&s.config).len(), 1, "one daemon for the machine");

    let http = reqwest::Client::new();
    let openai = (0..3).map(|_| async {
        let body =
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let r = http
            .post(format!("{}/v1/chat/completions", s.http))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    });
    let mcp = [&a, &b, &c]
        .into_iter()
        .flat_map(|client| (0..3).map(move |_| client.call_tool(completion(4, 10))));
    let (mcp, openai) = tokio::join!(
        futures::future::join_all(mcp),
        futures::future::join_all(openai)
    );
    for r in mcp {
        assert_eq!(text(&r.unwrap()), "tok0 tok1 tok2 tok3 ");
    }
    assert!(openai.iter().all(|t| t.contains("[DONE]")));
    let records = sim.chat_records();
    assert_eq!(records.len(), 12, "every call reached the host once");
    assert_eq!(
        sim.stats().peak_in_flight,
        1,
        "the host never saw two requests at once"
    );

    // The daemon lists its clients (pid from the bridge, name from the MCP handshake).
    let status = a
        .call_tool(call("dispatch_status", json!({})))
        .await
        .unwrap();
    let clients = status.structured_content.unwrap()["clients"].clone();
    let clients = clients.as_array().unwrap();
    assert_eq!(clients.len(), 3, "{clients:?}");
    assert!(
        clients
            .iter()
            .all(|c| c["transport"] == "bridge" && c["pid"].as_u64().is_some())
    );
    assert!(clients.iter().any(|c| c["name"].is_string()), "{clients:?}");

    // Cancellation goes through the bridge: the host connection drops.
    let long =
        tokio::time::timeout(Duration::from_millis(300), b.call_tool(completion(300, 20))).await;
    assert!(long.is_err());
    assert!(
        sim.wait_idle(Duration::from_secs(2)).await,
        "cancel reached the host"
    );
    assert_eq!(
        sim.chat_records().last().unwrap().outcome,
        Outcome::ClientDisconnected
    );
    for client in [a, b, c] {
        client.cancel().await.unwrap();
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_dies_mid_run_fails_the_calls_in_flight_and_the_next_call_recovers() {
    let sim = sim().await;
    let s = setup("kill", &sim, 30.0);
    let client = launch(&s.config).await;
    let first = daemons(&s.config);
    assert_eq!(first.len(), 1);

    let peer = client.peer().clone();
    let in_flight = tokio::spawn(async move { peer.call_tool(completion(300, 20)).await });
    assert!(wait_until(Duration::from_secs(2), || sim.stats().in_flight == 1).await);
    std::process::Command::new("kill")
        .arg("-9")
        .arg(first[0].to_string())
        .status()
        .unwrap();
    let error = in_flight
        .await
        .unwrap()
        .expect_err("the call in flight fails");
    let message = error.to_string();
    assert!(message.contains("daemon went away"), "{message}");

    // The next call starts a new daemon (the bridge replays the handshake) and goes through.
    let r = client.call_tool(completion(2, 5)).await.expect("recovered");
    assert_eq!(text(&r), "tok0 tok1 ");
    let second = daemons(&s.config);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first, "a new daemon");
    client.cancel().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_exits_by_itself_but_not_while_a_task_runs() {
    let sim = sim().await;
    let s = setup("idle", &sim, 0.5);
    let client = launch(&s.config).await;
    assert_eq!(daemons(&s.config).len(), 1);
    client.cancel().await.unwrap();

    // No client any more, but a task arrives over HTTP and runs for ~1.5 s.
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user",
        "content": sim_directive(json!({"tokens": 30, "token_interval_ms": 50}))}]});
    let running = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.http))
        .json(&body)
        .send();
    let response = running.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        daemons(&s.config).len(),
        1,
        "the daemon stays while a task runs"
    );
    assert!(response.text().await.unwrap().contains("[DONE]"));
    assert!(
        wait_until(Duration::from_secs(5), || daemons(&s.config).is_empty()).await,
        "the idle daemon exits"
    );
    assert!(
        !s.dir.join("daemon.sock").exists(),
        "and removes its socket"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_arriving_as_the_idle_daemon_exits_is_served() {
    // The daemon exits 0.3 s after its last client leaves. Launches arrive at every moment
    // around that instant, 10 ms apart: each must be served — by the old daemon or a new
    // one — and never see "the daemon went away".
    let sim = sim().await;
    let s = setup("race", &sim, 0.3);
    let mut failures = Vec::new();
    for delay_ms in (200..=460).step_by(10) {
        let client = launch(&s.config).await;
        let r = client.call_tool(completion(1, 0)).await;
        if let Err(e) = &r {
            failures.push(format!("{delay_ms} ms: {e}"));
        }
        client.cancel().await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    let client = launch(&s.config).await;
    client.call_tool(completion(1, 0)).await.unwrap();
    client.cancel().await.unwrap();
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    assert_eq!(
        sim.stats().peak_in_flight,
        1,
        "never two requests on the one slot"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_by_sigterm_removes_its_socket() {
    let sim = sim().await;
    let s = setup("sigterm", &sim, 600.0);
    let client = launch(&s.config).await;
    client.call_tool(completion(1, 0)).await.unwrap();
    let pids = daemons(&s.config);
    assert_eq!(pids.len(), 1);
    let socket = s.dir.join("daemon.sock");
    assert!(socket.exists());
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pids[0].to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        wait_until(Duration::from_secs(5), || daemons(&s.config).is_empty()).await,
        "the daemon exits on SIGTERM"
    );
    assert!(!socket.exists(), "and removes its socket file");
    client.cancel().await.unwrap();
    sim.shutdown().await;
}
