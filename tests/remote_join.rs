//! Joining a fleet on another machine: `prix-dispatch stdio --connect URL` bridges MCP stdio to
//! a `prix-dispatch serve` daemon's `/mcp` endpoint. The daemon is the built binary, on
//! 127.0.0.1, in front of a simulated one-slot host; the launches are driven by rmcp's client,
//! or by raw JSON-RPC lines where the exact error text is the point.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use prix_dispatch::sim::{Behaviour, Outcome, RequestRecord, SimConfig, SimHost, sim_directive};
use rmcp::ServiceExt;
use rmcp::handler::client::ClientHandler;
use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const BIN: &str = env!("CARGO_BIN_EXE_prix-dispatch");
/// Bound on anything that should take well under a second.
const PROMPT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Collector {
    progress: Arc<std::sync::Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Collector {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

/// `prix-dispatch serve` as a child process, on a fixed port so that it can be restarted there.
struct Daemon {
    child: Child,
    port: u16,
    config: PathBuf,
    token: Option<(String, String)>,
}

/// A private directory for one test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("prix-dispatch-remote-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    /// A daemon for `sim` on a free port; with `token`, it requires it (via `auth_token_env`).
    async fn start(scratch: &Scratch, sim: &SimHost, token: Option<&str>) -> Daemon {
        Self::start_on(common::free_port(), scratch, sim, token).await
    }

    async fn start_on(port: u16, scratch: &Scratch, sim: &SimHost, token: Option<&str>) -> Daemon {
        let var = format!("REMOTE_JOIN_TEST_TOKEN_{}", std::process::id());
        let auth = token.map_or(String::new(), |_| format!("auth_token_env = \"{var}\"\n"));
        let config = scratch.write(
            "fleet.toml",
            &format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nsocket = \"{}\"\n{auth}\
                 [[host]]\nname = \"gpu0\"\nurl = \"{}\"\nslots = 1\n",
                scratch.0.join("daemon.sock").display(),
                sim.url()
            ),
        );
        let token = token.map(|t| (var, t.to_string()));
        let child = spawn_serve(&config, token.as_ref());
        let daemon = Daemon {
            child,
            port,
            config,
            token,
        };
        daemon.wait_healthy().await;
        daemon
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let health = http.get(format!("{}/healthz", self.url())).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not come up"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no goodbye to anyone, as a workstation that loses power.
    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// A new daemon on the same port and configuration (it knows none of the old sessions).
    async fn restart(&mut self) {
        self.child = spawn_serve(&self.config, self.token.as_ref());
        self.wait_healthy().await;
    }

    /// The daemon's `/status`.
    async fn status(&self) -> Value {
        let mut request = reqwest::Client::new().get(format!("{}/status", self.url()));
        if let Some((_, token)) = &self.token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// The MCP sessions the daemon counts among its clients.
    async fn http_clients(&self) -> Vec<Value> {
        let status = self.status().await;
        status["clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["transport"] == "http")
            .cloned()
            .collect()
    }
}

fn spawn_serve(config: &std::path::Path, token: Option<&(String, String)>) -> Child {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Some((var, value)) = token {
        command.env(var, value);
    }
    command.spawn().unwrap()
}

/// `stdio` with `args`, driven by rmcp's client; `token` goes in PRIX_DISPATCH_TOKEN.
async fn launch(args: &[&str], token: Option<&str>) -> RunningService<RoleClient, Collector> {
    let command = tokio::process::Command::new(BIN).configure(|c| {
        c.arg("stdio")
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("PRIX_DISPATCH_TOKEN")
            .env_remove("PRIX_DISPATCH_CONFIG");
        if let Some(token) = token {
            c.env("PRIX_DISPATCH_TOKEN", token);
        }
    });
    tokio::time::timeout(
        PROMPT,
        Collector::default().serve(TokioChildProcess::new(command).unwrap()),
    )
    .await
    .expect("handshake in time")
    .expect("MCP handshake through the remote bridge")
}

async fn join(url: &str, token: Option<&str>) -> RunningService<RoleClient, Collector> {
    launch(&["--connect", url], token).await
}

/// A launch driven line by line, with its stderr collected.
struct Raw {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Raw {
    fn start(url: &str, token: Option<&str>) -> Raw {
        let mut command = tokio::process::Command::new(BIN);
        command
            .arg("stdio")
            .arg("--connect")
            .arg(url)
            .env("RUST_LOG", "debug")
            .env_remove("PRIX_DISPATCH_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("PRIX_DISPATCH_TOKEN", token);
        }
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Raw {
            child,
            stdin,
            lines,
            stderr,
        }
    }

    async fn send(&mut self, message: Value) {
        self.stdin
            .write_all(format!("{message}\n").as_bytes())
            .await
            .unwrap();
    }

    /// The answer to request `id`; every line on stdout must be a JSON-RPC message.
    async fn answer(&mut self, id: u64) -> Value {
        self.answer_after(id).await.0
    }

    /// The answer to request `id`, and the notifications before it with when each arrived.
    async fn answer_after(&mut self, id: u64) -> (Value, Vec<(tokio::time::Instant, Value)>) {
        let mut before = Vec::new();
        loop {
            let line = tokio::time::timeout(PROMPT, self.lines.next_line())
                .await
                .expect("an answer in time")
                .unwrap()
                .expect("stdout still open");
            let message: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stdout carried a non-JSON line {line:?}: {e}"));
            assert_eq!(message["jsonrpc"], "2.0", "{line}");
            if message.get("method").is_none() && message["id"] == id {
                return (message, before);
            }
            before.push((tokio::time::Instant::now(), message));
        }
    }

    async fn initialize(&mut self) -> Value {
        self.send(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "1"}}}),
        )
        .await;
        self.answer(1).await
    }

    /// Closes stdin; the launch must exit by itself. Returns its exit status and stderr.
    async fn finish(mut self) -> (std::process::ExitStatus, String) {
        drop(self.stdin);
        let status = tokio::time::timeout(PROMPT, self.child.wait())
            .await
            .expect("the launch exits once stdin closes")
            .unwrap();
        (status, self.stderr.await.unwrap())
    }
}

fn call(name: &str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_string()).with_arguments(args.as_object().unwrap().clone())
}

fn completion(tool: &str, tokens: usize, interval_ms: u64) -> CallToolRequestParams {
    call(
        tool,
        json!({"model_id": "m", "messages": [{"role": "user",
            "content": sim_directive(json!({"tokens": tokens, "token_interval_ms": interval_ms}))}]}),
    )
}

fn expected(tokens: usize) -> String {
    (0..tokens).map(|i| format!("tok{i} ")).collect()
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

/// Most requests the host ever had in flight at once, from its own start and end times.
fn peak_from_records(records: &[RequestRecord]) -> usize {
    records
        .iter()
        .map(|r| {
            records
                .iter()
                .filter(|s| s.start_us <= r.start_us && s.end_us.is_none_or(|end| r.start_us < end))
                .count()
        })
        .max()
        .unwrap_or(0)
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
async fn mcp_through_the_bridge_and_openai_clients_share_the_daemons_one_queue() {
    let sim = sim().await;
    let scratch = Scratch::new("share");
    let daemon = Daemon::start(&scratch, &sim, None).await;
    // The base URL is accepted with a trailing /mcp/ as well.
    let client = join(&format!("{}/mcp/", daemon.url()), None).await;

    let http = reqwest::Client::new();
    let openai = (0..3).map(|_| async {
        let body = json!({"model": "m", "stream": true, "messages": [{"role": "user",
            "content": sim_directive(json!({"tokens": 4, "token_interval_ms": 20}))}]});
        let response = http
            .post(format!("{}/v1/chat/completions", daemon.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut content = String::new();
        for line in response.text().await.unwrap().lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
                content.push_str(delta);
            }
        }
        content
    });
    let mcp = (0..3).map(|_| client.call_tool(completion("complete_stream", 4, 20)));
    let (mcp, openai) = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join(
            futures::future::join_all(mcp),
            futures::future::join_all(openai),
        ),
    )
    .await
    .expect("all six calls finish");
    for r in mcp {
        assert_eq!(text(&r.expect("MCP call through the bridge")), expected(4));
    }
    for content in openai {
        assert_eq!(content, expected(4));
    }
    let records = sim.chat_records();
    assert_eq!(records.len(), 6, "every call reached the host once");
    assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    assert_eq!(
        peak_from_records(&records),
        1,
        "the host's own records show two requests at once: {records:#?}"
    );
    common::assert_host_invariants(&records, 1);

    // Calls through one launch are concurrent: a status call is answered while a completion
    // still streams on the same stdio session.
    let peer = client.peer().clone();
    let long =
        tokio::spawn(async move { peer.call_tool(completion("complete_stream", 40, 25)).await });
    assert!(wait_until(PROMPT, || sim.stats().in_flight == 1).await);
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        client.call_tool(call("dispatch_status", json!({}))),
    )
    .await
    .expect("not queued behind the streaming call")
    .unwrap();
    assert_eq!(status.structured_content.unwrap()["hosts"][0]["active"], 1);
    assert_eq!(
        sim.stats().in_flight,
        1,
        "the long call was still streaming"
    );
    let long = tokio::time::timeout(PROMPT, long).await.unwrap().unwrap();
    assert_eq!(text(&long.unwrap()), expected(40));

    // The daemon knows the launch by the name from the client's handshake.
    let clients = daemon.http_clients().await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert!(clients[0]["name"].is_string(), "{clients:?}");
    client.cancel().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_token_refuses_launches_without_the_right_one() {
    let sim = sim().await;
    let scratch = Scratch::new("token");
    let secret = "fleet-secret-4711";
    let daemon = Daemon::start(&scratch, &sim, Some(secret)).await;

    // No token at all.
    let mut raw = Raw::start(&daemon.url(), None);
    let answer = raw.initialize().await;
    let message = answer["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&format!("the daemon at {}/mcp refused", daemon.url()))
            && message.contains("PRIX_DISPATCH_TOKEN is not set")
            && message.contains("auth_token_env"),
        "{message}"
    );
    let (status, stderr) = raw.finish().await;
    assert!(status.success(), "closing stdin ends the launch normally");
    assert!(!stderr.contains(secret));

    // A wrong token: refused, and never printed (stderr logs at debug here).
    let wrong = "wrong-token-0815";
    let mut raw = Raw::start(&daemon.url(), Some(wrong));
    let answer = raw.initialize().await;
    let message = answer["error"]["message"].as_str().unwrap().to_string();
    assert_eq!(
        message,
        format!(
            "the daemon at {}/mcp refused the token: set PRIX_DISPATCH_TOKEN to the token its \
             auth_token_env names",
            daemon.url()
        )
    );
    // The launch stays usable: the next request gets the same clear answer, not a hang.
    raw.send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    let again = raw.answer(2).await;
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused the token"),
        "{again}"
    );
    let (_, stderr) = raw.finish().await;
    assert!(!stderr.contains(wrong), "the token leaked into the log");
    assert!(sim.chat_records().is_empty());

    // The right token works.
    let client = join(&daemon.url(), Some(secret)).await;
    let r = client
        .call_tool(completion("complete", 3, 0))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(3));
    client.cancel().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_dies_mid_call_fails_it_and_the_next_call_rejoins_the_restarted_one() {
    let sim = sim().await;
    let scratch = Scratch::new("restart");
    let mut daemon = Daemon::start(&scratch, &sim, None).await;
    let client = join(&daemon.url(), None).await;
    let endpoint = format!("{}/mcp", daemon.url());
    let r = client
        .call_tool(completion("complete", 2, 0))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(2));

    let peer = client.peer().clone();
    let in_flight =
        tokio::spawn(async move { peer.call_tool(completion("complete_stream", 300, 20)).await });
    assert!(wait_until(PROMPT, || sim.stats().in_flight == 1).await);
    daemon.kill().await;
    let error = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the call in flight fails promptly, no hang")
        .unwrap()
        .expect_err("the call in flight fails");
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "the prix-dispatch daemon at {endpoint} went away while this call ran; retry"
        )),
        "{message}"
    );
    assert!(
        sim.wait_idle(Duration::from_secs(5)).await,
        "the dead daemon's host request ended"
    );

    // While it is down, a call says so at once.
    let down = tokio::time::timeout(
        Duration::from_secs(5),
        client.call_tool(completion("complete", 2, 0)),
    )
    .await
    .expect("no hang while the daemon is down")
    .expect_err("nothing to run it");
    let message = down.to_string();
    assert!(
        message.contains(&format!(
            "cannot reach the prix-dispatch daemon at {endpoint}: connection refused; is \
             `prix-dispatch serve` running there"
        )),
        "{message}"
    );

    // A new daemon on the same port knows nothing of the session: the bridge replays the
    // handshake (after the 404) and the call goes through on the same stdio session.
    daemon.restart().await;
    let r = tokio::time::timeout(
        PROMPT,
        client.call_tool(completion("complete_stream", 3, 5)),
    )
    .await
    .expect("in time")
    .expect("recovered on the restarted daemon");
    assert_eq!(text(&r), expected(3));
    let clients = daemon.http_clients().await;
    assert_eq!(clients.len(), 1, "one re-initialised session: {clients:?}");
    assert!(
        clients[0]["name"].is_string(),
        "the replayed handshake carried the client's name: {clients:?}"
    );
    client.cancel().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_started_before_its_daemon_works_once_it_is_up_and_relays_progress_live() {
    let sim = sim().await;
    let scratch = Scratch::new("early");
    // Reserve a port, then start nothing there yet.
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut raw = Raw::start(&url, None);
    let answer = raw.initialize().await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!(
            "cannot reach the prix-dispatch daemon at {url}/mcp: connection refused; is \
             `prix-dispatch serve` running there, and does its [server] listen / allowed_hosts \
             admit this machine?"
        )
    );
    // The daemon comes up on that port; the next call opens the session with the client's
    // handshake first.
    let _daemon = Daemon::start_on(port, &scratch, &sim, None).await;
    raw.send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "complete", "arguments": {"model_id": "m",
            "messages": [{"role": "user", "content": "hi"}]}}}),
    )
    .await;
    let answer = raw.answer(2).await;
    assert_eq!(answer["result"]["isError"], false, "{answer}");
    assert_eq!(
        answer["result"]["content"][0]["text"],
        expected(4),
        "{answer}"
    );

    // Progress comes through on stdout in order, each notification as the daemon sends it.
    raw.send(
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "complete_stream", "_meta": {"progressToken": "p3"}, "arguments": {"model_id": "m",
            "messages": [{"role": "user",
                "content": sim_directive(json!({"tokens": 5, "token_interval_ms": 100}))}]}}}),
    )
    .await;
    let (answer, notes) = raw.answer_after(3).await;
    let answered = tokio::time::Instant::now();
    assert_eq!(answer["result"]["content"][0]["text"], expected(5));
    let progress: Vec<&(tokio::time::Instant, Value)> = notes
        .iter()
        .filter(|(_, n)| n["method"] == "notifications/progress")
        .collect();
    assert!(
        progress
            .iter()
            .all(|(_, n)| n["params"]["progressToken"] == "p3"),
        "{notes:?}"
    );
    let values: Vec<f64> = progress
        .iter()
        .map(|(_, n)| n["params"]["progress"].as_f64().unwrap())
        .collect();
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "progress in order on stdout: {values:?}"
    );
    let deltas: Vec<&(tokio::time::Instant, Value)> = progress
        .iter()
        .copied()
        .filter(|(_, n)| {
            n["params"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("tok"))
        })
        .collect();
    let text: String = deltas
        .iter()
        .map(|(_, n)| n["params"]["message"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected(5));
    let first = deltas[0].0;
    assert!(
        answered - first >= Duration::from_millis(300),
        "the first delta came {:?} before the answer: batched, not relayed live",
        answered - first
    );
    let (status, _) = raw.finish().await;
    assert!(status.success());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_cancellation_and_a_closed_stdin_reach_through_the_bridge() {
    let sim = sim().await;
    let scratch = Scratch::new("progress");
    let daemon = Daemon::start(&scratch, &sim, None).await;
    let collector = Collector::default();
    let progress = collector.progress.clone();
    let command = tokio::process::Command::new(BIN).configure(|c| {
        c.arg("stdio")
            .arg("--connect")
            .arg(daemon.url())
            .env("RUST_LOG", "warn");
    });
    let client = tokio::time::timeout(
        PROMPT,
        collector.serve(TokioChildProcess::new(command).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();

    // Progress is relayed as it is sent: every delta, in order, before the result.
    let r = client
        .call_tool(completion("complete_stream", 6, 20))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(6));
    // rmcp's client runs each notification handler in a task of its own, so the collector
    // sees them in any order, possibly after the result; the order on the wire is checked
    // with a raw client (in the test above).
    let deltas_seen = || {
        progress
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.message.as_deref().is_some_and(|m| m.starts_with("tok")))
            .count()
    };
    assert!(wait_until(PROMPT, || deltas_seen() >= 6).await);
    let mut seen = progress.lock().unwrap().clone();
    seen.sort_by(|a, b| a.progress.total_cmp(&b.progress));
    let values: Vec<f64> = seen.iter().map(|p| p.progress).collect();
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "one notification per progress value: {values:?}"
    );
    let deltas: String = seen
        .iter()
        .filter_map(|p| p.message.clone())
        .filter(|m| m.starts_with("tok"))
        .collect();
    assert_eq!(deltas, expected(6), "every delta arrived as progress");

    // Abandoning a call sends notifications/cancelled: the host request is dropped.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(400),
        client.call_tool(completion("complete_stream", 300, 20)),
    )
    .await;
    assert!(abandoned.is_err(), "the call was still running");
    assert!(
        sim.wait_idle(Duration::from_secs(3)).await,
        "the host still streams a cancelled call"
    );
    let records = sim.chat_records();
    assert_eq!(records.last().unwrap().outcome, Outcome::ClientDisconnected);
    assert!(records.last().unwrap().tokens_sent < 300);
    // The session goes on.
    let r = client
        .call_tool(completion("complete", 2, 0))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(2));

    // Closing stdin mid-call: the host request is dropped and the daemon forgets the session.
    assert_eq!(daemon.http_clients().await.len(), 1);
    let peer = client.peer().clone();
    let running =
        tokio::spawn(async move { peer.call_tool(completion("complete_stream", 300, 20)).await });
    assert!(wait_until(PROMPT, || sim.stats().in_flight == 1).await);
    client.cancel().await.unwrap();
    assert!(
        sim.wait_idle(Duration::from_secs(3)).await,
        "the host still streams after the client left"
    );
    assert_eq!(
        sim.chat_records().last().unwrap().outcome,
        Outcome::ClientDisconnected
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !daemon.http_clients().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session was not ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = running.await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_server_connect_joins_like_the_flag_and_the_flag_wins() {
    let sim = sim().await;
    let scratch = Scratch::new("config");
    let daemon = Daemon::start(&scratch, &sim, None).await;
    let joining = scratch.write(
        "laptop.toml",
        &format!("[server]\nconnect = \"{}/\"\n", daemon.url()),
    );
    let client = launch(&["--config", joining.to_str().unwrap()], None).await;
    let r = client
        .call_tool(completion("complete", 2, 0))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(2));
    client.cancel().await.unwrap();

    // --connect overrides the file's connect (which points where nothing listens).
    let elsewhere = scratch.write(
        "elsewhere.toml",
        &format!(
            "[server]\nconnect = \"http://127.0.0.1:{}\"\n",
            common::free_port()
        ),
    );
    let client = launch(
        &[
            "--config",
            elsewhere.to_str().unwrap(),
            "--connect",
            &daemon.url(),
        ],
        None,
    )
    .await;
    let r = client
        .call_tool(completion("complete", 2, 0))
        .await
        .unwrap();
    assert_eq!(text(&r), expected(2));
    client.cancel().await.unwrap();
    assert_eq!(sim.chat_records().len(), 2);

    // A joining configuration has no fleet to serve.
    let served = tokio::time::timeout(
        PROMPT,
        tokio::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&joining)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!served.status.success());
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(stderr.contains("[server] connect"), "{stderr}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_client_passes_through_and_wrong_addresses_get_clear_errors() {
    let sim = sim().await;
    let scratch = Scratch::new("stateless");
    let daemon = Daemon::start(&scratch, &sim, None).await;

    // The 2026-07-28 revision has no handshake: each request carries its version in _meta,
    // and the bridge mirrors it (and the method and tool name) into the headers it requires.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "stateless-test", "version": "1"}});
    let mut raw = Raw::start(&daemon.url(), None);
    raw.send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover",
        "params": {"_meta": meta}}),
    )
    .await;
    let discovered = raw.answer(1).await;
    assert!(
        discovered["result"]["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("2026-07-28"))),
        "{discovered}"
    );
    raw.send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "_meta": meta, "name": "complete", "arguments": {"model_id": "m",
            "messages": [{"role": "user", "content": "hi"}]}}}),
    )
    .await;
    let answer = raw.answer(2).await;
    assert_eq!(
        answer["result"]["content"][0]["text"],
        expected(4),
        "{answer}"
    );
    let (status, _) = raw.finish().await;
    assert!(status.success());

    // The same daemon reached by an address outside its allowed_hosts (an IPv4-mapped IPv6
    // address still lands on 127.0.0.1).
    let mapped = format!("http://[::ffff:127.0.0.1]:{}", daemon.port);
    let mut raw = Raw::start(&mapped, None);
    let answer = raw.initialize().await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("does not accept the name this machine reached it by ([::ffff:7f00:1])")
            && message.contains("allowed_hosts"),
        "{message}"
    );
    raw.finish().await;

    // A path where the daemon has no endpoint.
    let mut raw = Raw::start(&format!("{}/fleet/", daemon.url()), None);
    let answer = raw.initialize().await;
    assert_eq!(
        answer["error"]["message"],
        format!(
            "{}/fleet/mcp answered HTTP 404: no MCP endpoint there; give the address of \
             `prix-dispatch serve` (its [server] listen)",
            daemon.url()
        )
    );
    raw.finish().await;

    // Not a daemon at all: the GPU server's own address (which answers 200 with an error
    // object of its own); nothing but JSON-RPC reaches stdout (`answer` checks every line).
    let mut raw = Raw::start(&sim.url(), None);
    let answer = raw.initialize().await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "the daemon at {}/mcp answered something",
            sim.url()
        )) && message.contains("not MCP JSON-RPC")
            && message.contains("is this the address of `prix-dispatch serve`?"),
        "{message}"
    );
    raw.finish().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_stopped_by_sigterm_mid_call_leaves_the_daemon_cleanly() {
    let sim = sim().await;
    let scratch = Scratch::new("sigterm");
    let daemon = Daemon::start(&scratch, &sim, None).await;
    let command = tokio::process::Command::new(BIN).configure(|c| {
        c.arg("stdio")
            .arg("--connect")
            .arg(daemon.url())
            .env("RUST_LOG", "warn");
    });
    let transport = TokioChildProcess::new(command).unwrap();
    let pid = transport.id().unwrap();
    let client = tokio::time::timeout(PROMPT, Collector::default().serve(transport))
        .await
        .unwrap()
        .unwrap();
    let peer = client.peer().clone();
    let running =
        tokio::spawn(async move { peer.call_tool(completion("complete_stream", 300, 20)).await });
    assert!(wait_until(PROMPT, || sim.stats().in_flight == 1).await);
    assert_eq!(daemon.http_clients().await.len(), 1);
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        sim.wait_idle(Duration::from_secs(3)).await,
        "the host still streams for a launch that was stopped"
    );
    assert_eq!(
        sim.chat_records().last().unwrap().outcome,
        Outcome::ClientDisconnected
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !daemon.http_clients().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session was not ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::time::timeout(PROMPT, running).await;
    let _ = client.cancel().await;
    sim.shutdown().await;
}
