//! A REAL llama.cpp `llama-server` refusing a prompt over its context size: whatever way this
//! build reports it (an `error:` field inside an HTTP 200 stream, or an HTTP 400), the MCP
//! path fails with the server's message, not retryable, and OpenAI clients get a 400 they do
//! not retry. The replayed bytes of the same answer are tested in `host_quirks.rs`.
//!
//! Needs `PRIX_LLAMA_SERVER` and `PRIX_SMOLLM_GGUF` (from `scripts/real-backend.sh`, which
//! `.ci/run` runs); without them it fails with instructions.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{HttpFront, spec};
use prix_dispatch::Dispatcher;
use prix_dispatch::config::{Config, ConfigSource, HostConfig};
use serde_json::{Value, json};

use common::real::required_path;

/// The server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_context_overflow_is_a_permanent_error_on_both_paths() {
    let bin = required_path("PRIX_LLAMA_SERVER");
    let gguf = required_path("PRIX_SMOLLM_GGUF");
    let port = common::free_port();
    let log = std::env::temp_dir().join(format!("prix-real-errors-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    let _server = Server(
        Command::new(&bin)
            .args(["-m", &gguf.display().to_string(), "--alias", "smollm2"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // A context far smaller than the prompt below.
            .args(["-np", "1", "-t", "1", "-tb", "1", "-c", "128"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("llama-server starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "llama-server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hosts = vec![HostConfig {
        name: "gpu0".into(),
        base_url: base.clone(),
        slots: 1,
        api_key: None,
        ..HostConfig::default()
    }];
    let dispatcher = Dispatcher::start(&Config::with_hosts(ConfigSource::Environment, hosts));
    let long = "the quick brown fox jumps over the lazy dog ".repeat(100);

    let e = dispatcher
        .run(spec("smollm2", &long, json!({"max_tokens": 8})), |_| {})
        .await
        .expect_err("a prompt over the context is not a success");
    assert!(!e.retryable, "{e}");
    assert!(
        e.message.contains("at gpu0") && e.message.contains("context"),
        "{e}"
    );
    eprintln!("typed path: {:?}: {}", e.kind, e.message);

    let front = HttpFront::start(&dispatcher, None, 1 << 20).await;
    for stream in [true, false] {
        let r = http
            .post(format!("{}/v1/chat/completions", front.base))
            .json(
                &json!({"model": "smollm2", "stream": stream, "max_tokens": 8,
                "messages": [{"role": "user", "content": long}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "stream {stream}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("context"),
            "{body}"
        );
    }
    drop(front);
    dispatcher.shutdown();
    let _ = std::fs::remove_file(&log);
}
