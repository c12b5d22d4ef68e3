//! One scheduler per GPU, however prix-dispatch is launched: launches with other environments
//! or other configuration sources for the same host end up in one daemon; a daemon reloads its
//! configuration without losing work; a second daemon for a host is refused, and a failed start
//! leaves nothing behind. Overlap is judged from the simulated hosts' own records.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prix_dispatch::daemon_dir::DaemonDir;
use prix_dispatch::sim::{Behaviour, SimConfig, SimHost, sim_directive};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_prix-dispatch");

/// The tests that use this user's default daemon socket run one at a time.
static DEFAULT_SOCKET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prix-one-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sim() -> SimHost {
    SimHost::start(SimConfig {
        models: vec!["m".into()],
        default: Behaviour {
            tokens: 5,
            token_interval_ms: 30,
            ..Behaviour::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn completion() -> CallToolRequestParams {
    CallToolRequestParams::new("complete".to_string()).with_arguments(
        json!({"model_id": "m", "messages": [{"role": "user",
            "content": sim_directive(json!({"tokens": 5, "token_interval_ms": 30}))}]})
        .as_object()
        .unwrap()
        .clone(),
    )
}

fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

/// A `stdio` launch as an agent host makes it: `env` is the whole environment it gets.
async fn launch(
    args: &[&str],
    env: &[(&str, String)],
    cwd: &Path,
) -> RunningService<RoleClient, ()> {
    let command = tokio::process::Command::new(BIN).configure(|c| {
        c.arg("stdio")
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .current_dir(cwd);
    });
    ().serve(TokioChildProcess::new(command).unwrap())
        .await
        .expect("MCP handshake through the bridge")
}

/// What the TypeScript MCP SDK passes to a server it launches by default.
fn sdk_env() -> Vec<(&'static str, String)> {
    ["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .collect()
}

/// Three calls from each client at once; every answer must be a success.
async fn calls_at_once(clients: &[&RunningService<RoleClient, ()>]) {
    let mut all = Vec::new();
    for client in clients {
        for _ in 0..3 {
            all.push(client.call_tool(completion()));
        }
    }
    for result in futures::future::join_all(all).await {
        let result = result.expect("call answered");
        assert_ne!(result.is_error, Some(true), "{}", text(&result));
    }
}

async fn prix(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

async fn status_json(socket: Option<&Path>) -> Option<Value> {
    let mut args = vec!["status", "--json"];
    let socket_arg;
    if let Some(s) = socket {
        socket_arg = s.display().to_string();
        args.extend(["--socket", socket_arg.as_str()]);
    }
    let out = prix(&args).await;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

async fn wait_for(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check().await
}

/// Stops whatever daemon holds this user's default socket, and waits until it is gone.
async fn stop_default_daemon() {
    let out = prix(&["stop"]).await;
    let _ = out;
    assert!(
        wait_for(Duration::from_secs(10), async || status_json(None)
            .await
            .is_none())
        .await,
        "the default daemon did not stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_with_and_without_xdg_runtime_dir_share_one_daemon() {
    let _default = DEFAULT_SOCKET.lock().await;
    stop_default_daemon().await;
    let sim = sim().await;
    let dir = scratch("xdg");
    let config = dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n[[host]]\nname = \"gpu0\"\nurl = \"{}\"\n",
            common::free_port(),
            sim.url()
        ),
    )
    .unwrap();
    let path = config.display().to_string();
    let args = ["--config", path.as_str()];
    // Claude Desktop through the TypeScript SDK: a bare environment.
    let bare = launch(&args, &sdk_env(), Path::new("/")).await;
    // A terminal launch: XDG_RUNTIME_DIR and TMPDIR set, another working directory.
    let runtime = dir.join("xdg");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut full = sdk_env();
    full.push(("XDG_RUNTIME_DIR", runtime.display().to_string()));
    full.push(("TMPDIR", dir.display().to_string()));
    let terminal = launch(&args, &full, &dir).await;

    calls_at_once(&[&bare, &terminal]).await;
    let stats = sim.stats();
    assert_eq!(
        stats.peak_in_flight, 1,
        "never two requests at once on the one-slot host"
    );
    common::assert_host_invariants(&sim.chat_records(), 1);
    assert_eq!(sim.chat_records().len(), 6);

    let status = status_json(None)
        .await
        .expect("one daemon at the default socket");
    let clients = status["status"]["clients"].as_array().unwrap();
    assert_eq!(
        clients.len(),
        2,
        "both launches are clients of the one daemon: {status}"
    );
    assert!(
        !runtime.read_dir().unwrap().any(|_| true),
        "nothing is put under XDG_RUNTIME_DIR"
    );
    bare.cancel().await.unwrap();
    terminal.cancel().await.unwrap();
    stop_default_daemon().await;
    assert!(!DaemonDir::for_this_user().unwrap().socket().exists());
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toml_launch_and_a_prompt_prix_variables_launch_share_one_daemon() {
    let _default = DEFAULT_SOCKET.lock().await;
    stop_default_daemon().await;
    let sim = sim().await;
    let dir = scratch("sources");
    let config = dir.join("desktop.toml");
    let port = sim.addr().port();
    // Another spelling of the same server: localhost, and a key the variables do not give.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n[[host]]\nname = \"gpu0\"\nurl = \"http://localhost:{port}\"\napi_key = \"k\"\n",
            common::free_port()
        ),
    )
    .unwrap();
    let path = config.display().to_string();
    let desktop = launch(&["--config", path.as_str()], &sdk_env(), &dir).await;
    let mut env = sdk_env();
    env.push((
        "LOCAL_INFERENCE_SERVER_1",
        format!("http://127.0.0.1:{port}/v1"),
    ));
    // The variables are the source (they win over a default file; the working directory is
    // never read).
    let prompt_prix = launch(&[], &env, &dir).await;

    calls_at_once(&[&desktop, &prompt_prix]).await;
    assert_eq!(sim.stats().peak_in_flight, 1);
    common::assert_host_invariants(&sim.chat_records(), 1);
    let status = status_json(None).await.expect("one daemon");
    assert_eq!(status["status"]["clients"].as_array().unwrap().len(), 2);
    assert_eq!(
        status["status"]["hosts"].as_array().unwrap().len(),
        1,
        "one host, scheduled once: {status}"
    );
    let log = std::fs::read_to_string(DaemonDir::for_this_user().unwrap().log()).unwrap();
    assert!(
        log.contains("different settings") && log.contains("desktop.toml"),
        "the key difference is named once, with both sources: {log}"
    );
    desktop.cancel().await.unwrap();
    prompt_prix.cancel().await.unwrap();
    stop_default_daemon().await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A hand-started `serve` with its stderr in `log`.
struct Serve {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Serve {
    fn start(config: &Path, log: PathBuf) -> Serve {
        let child = tokio::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Serve { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn fleet_toml(port: u16, socket: &Path, hosts: &[(&str, String, usize)]) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nsocket = \"{}\"\n",
        socket.display()
    );
    for (name, url, slots) in hosts {
        text.push_str(&format!(
            "[[host]]\nname = \"{name}\"\nurl = \"{url}\"\nslots = {slots}\n"
        ));
    }
    text
}

async fn openai_calls(base: &str, n: usize) {
    let http = reqwest::Client::new();
    let calls = (0..n).map(|_| {
        http.post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": "m", "messages": [{"role": "user",
                "content": sim_directive(json!({"tokens": 5, "token_interval_ms": 40}))}]}))
            .send()
    });
    for answer in futures::future::join_all(calls).await {
        let answer = answer.expect("answered");
        assert!(answer.status().is_success(), "{:?}", answer.text().await);
    }
}

async fn host_names(base: &str) -> Vec<String> {
    let status: Value = reqwest::get(format!("{base}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_config_reloads_the_running_daemon_without_overlap() {
    let (a, b) = (sim().await, sim().await);
    let dir = scratch("reload");
    let socket = dir.join("daemon.sock");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.join("fleet.toml");
    std::fs::write(&config, fleet_toml(port, &socket, &[("a", a.url(), 1)])).unwrap();
    let serve = Serve::start(&config, dir.join("serve.log"));
    assert!(
        wait_for(Duration::from_secs(20), async || reqwest::get(format!(
            "{base}/healthz"
        ))
        .await
        .is_ok())
        .await,
        "daemon up: {}",
        serve.log()
    );

    // Calls run while the file gains a host.
    let running = tokio::spawn({
        let base = base.clone();
        async move { openai_calls(&base, 4).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(
        &config,
        fleet_toml(port, &socket, &[("a", a.url(), 1), ("b", b.url(), 1)]),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), async || host_names(&base).await
            == ["a", "b"])
        .await,
        "the new host joined: {}",
        serve.log()
    );
    running.await.unwrap();
    openai_calls(&base, 8).await;
    assert!(
        !b.chat_records().is_empty(),
        "the added host serves: {}",
        serve.log()
    );
    common::assert_host_invariants(&a.chat_records(), 1);
    common::assert_host_invariants(&b.chat_records(), 1);
    assert_eq!(
        a.chat_records().len() + b.chat_records().len(),
        12,
        "no call lost"
    );

    // An invalid edit keeps the fleet and says why.
    std::fs::write(
        &config,
        fleet_toml(port, &socket, &[("a", a.url(), 0), ("b", b.url(), 1)]),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), async || serve
            .log()
            .contains("configuration reload refused"))
        .await,
        "{}",
        serve.log()
    );
    assert!(
        serve.log().contains("slots must be at least 1"),
        "{}",
        serve.log()
    );
    // The daemon's own reads of the file are no change: it does not re-read (and refuse)
    // again and again, and one error is logged once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        serve.log().matches("configuration reload refused").count(),
        1,
        "{}",
        serve.log()
    );
    assert_eq!(host_names(&base).await, ["a", "b"]);
    openai_calls(&base, 2).await;

    // A host removed while it runs a task: the task finishes, then the host leaves.
    let running = tokio::spawn({
        let base = base.clone();
        async move { openai_calls(&base, 2).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&config, fleet_toml(port, &socket, &[("b", b.url(), 2)])).unwrap();
    running.await.unwrap();
    assert!(
        wait_for(Duration::from_secs(10), async || host_names(&base).await
            == ["b"])
        .await,
        "{}",
        serve.log()
    );
    let before = a.chat_records().len();
    openai_calls(&base, 4).await;
    assert_eq!(
        a.chat_records().len(),
        before,
        "a removed host takes no new work"
    );
    common::assert_host_invariants(&a.chat_records(), 1);
    common::assert_host_invariants(&b.chat_records(), 2);
    // Its lock is released once its last task is done: another daemon may now take it.
    let lock = DaemonDir::for_this_user()
        .unwrap()
        .host_lock(&prix_dispatch::config::host_identity(&a.url()));
    assert!(
        wait_for(Duration::from_secs(5), async || !lock.exists()).await,
        "the removed host's lock is released"
    );

    let out = prix(&["stop", "--socket", socket.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(!socket.exists(), "socket removed by the stop");
    a.shutdown().await;
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_by_hand_is_joined_or_refused_never_doubled() {
    let (a, c) = (sim().await, sim().await);
    let dir = scratch("hand");
    let socket = dir.join("serve.sock");
    let port = common::free_port();
    let config = dir.join("serve.toml");
    std::fs::write(&config, fleet_toml(port, &socket, &[("gpu", a.url(), 1)])).unwrap();
    let mut serve = Serve::start(&config, dir.join("serve.log"));
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_for(Duration::from_secs(20), async || reqwest::get(format!(
            "{base}/healthz"
        ))
        .await
        .is_ok())
        .await,
        "{}",
        serve.log()
    );
    let pid = serve.child.id().unwrap().to_string();
    let a_localhost = a.url().replace("127.0.0.1", "localhost");

    // A launch whose config names the same host (another spelling, another socket) finds the
    // daemon that owns it, and starts none of its own.
    let other_socket = dir.join("launch.sock");
    let join = dir.join("join.toml");
    std::fs::write(
        &join,
        fleet_toml(
            common::free_port(),
            &other_socket,
            &[("x", a_localhost.clone(), 1)],
        ),
    )
    .unwrap();
    let path = join.display().to_string();
    let client = launch(&["--config", path.as_str()], &sdk_env(), &dir).await;
    let clients = [&client];
    tokio::join!(calls_at_once(&clients), openai_calls(&base, 3));
    assert_eq!(a.stats().peak_in_flight, 1, "one queue for the host");
    assert!(!other_socket.exists(), "no second daemon was started");
    client.cancel().await.unwrap();

    // A launch that needs a host the hand-started daemon lacks is refused, by name.
    let wider = dir.join("wider.toml");
    std::fs::write(
        &wider,
        fleet_toml(
            common::free_port(),
            &other_socket,
            &[("x", a_localhost.clone(), 1), ("c", c.url(), 1)],
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["stdio", "--config", wider.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{initialize}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let answer: Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&pid)
                && message.contains("started by hand")
                && message.contains(&c.url()),
            "names the daemon, and the host it lacks: {message}"
        );
        assert!(
            message.contains("prix-dispatch stop"),
            "says what to do: {message}"
        );
    }
    assert!(!other_socket.exists(), "no second daemon");

    // A second `serve` for the same host is refused, naming the first; it leaves no socket.
    let second = dir.join("second.toml");
    let second_socket = dir.join("second.sock");
    std::fs::write(
        &second,
        fleet_toml(
            common::free_port(),
            &second_socket,
            &[("y", a_localhost.clone(), 2)],
        ),
    )
    .unwrap();
    let out = prix(&["serve", "--config", second.to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("already scheduled by another prix-dispatch daemon") && err.contains(&pid),
        "{err}"
    );
    assert!(!second_socket.exists(), "no stale socket");

    // A `serve` on the first one's port names it; nothing is left behind.
    let held = dir.join("held.toml");
    std::fs::write(
        &held,
        fleet_toml(port, &second_socket, &[("c", c.url(), 1)]),
    )
    .unwrap();
    let out = prix(&["serve", "--config", held.to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("held by the prix-dispatch daemon pid") && err.contains(&pid),
        "{err}"
    );
    assert!(!second_socket.exists(), "no stale socket");
    let c_lock = DaemonDir::for_this_user()
        .unwrap()
        .host_lock(&prix_dispatch::config::host_identity(&c.url()));
    assert!(!c_lock.exists(), "no stale host lock");

    common::assert_host_invariants(&a.chat_records(), 1);
    assert!(c.chat_records().is_empty(), "c was never scheduled");
    let out = prix(&["stop", "--socket", socket.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let exit = tokio::time::timeout(Duration::from_secs(10), serve.child.wait())
        .await
        .expect("the daemon exits after `stop`")
        .unwrap();
    assert!(exit.success(), "graceful stop exits 0");
    a.shutdown().await;
    c.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn healthy(base: &str) -> bool {
    wait_for(Duration::from_secs(20), async || {
        reqwest::get(format!("{base}/healthz")).await.is_ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_once_the_daemon_has_exited_so_the_next_one_starts_at_once() {
    let a = sim().await;
    let dir = scratch("stop");
    let socket = dir.join("daemon.sock");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.join("fleet.toml");
    std::fs::write(&config, fleet_toml(port, &socket, &[("a", a.url(), 1)])).unwrap();
    let lock = DaemonDir::for_this_user()
        .unwrap()
        .host_lock(&prix_dispatch::config::host_identity(&a.url()));
    for round in 0..2 {
        let mut serve = Serve::start(&config, dir.join(format!("serve{round}.log")));
        assert!(healthy(&base).await, "round {round}: {}", serve.log());
        let out = prix(&["stop", "--socket", socket.to_str().unwrap()]).await;
        assert!(out.status.success(), "{out:?}");
        // `try_wait` reaps: Some only if the process had exited by the time `stop` returned.
        let exit = serve.child.try_wait().unwrap();
        assert!(
            exit.is_some_and(|e| e.success()),
            "round {round}: the daemon had exited when `stop` returned: {exit:?} {}",
            serve.log()
        );
        assert!(!socket.exists());
        assert!(
            !lock.exists(),
            "round {round}: the host's lock file is removed on stop, not left naming a dead pid"
        );
    }
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
