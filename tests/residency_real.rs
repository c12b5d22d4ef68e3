//! `HostClient::read_residency` against REAL llama.cpp servers: a router (`--models-dir`,
//! `--models-max 1`) whose `/v1/models` carries each model's `status`, and a single-model
//! server that tells nothing. Checks that the parser reads what the router really says while
//! it swaps models, and that a server without any listing is learnt to be so.
//!
//! Like tests/real_backend.rs it needs `PRIX_LLAMA_SERVER` and `PRIX_SMOLLM_GGUF` (from
//! `scripts/real-backend.sh`, which `.ci/run` runs); without them it fails.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prix_dispatch::backend::residency::{ResidencyProbe, ResidencySource};
use prix_dispatch::backend::{HostClient, http_client};
use prix_dispatch::config::HostConfig;
use serde_json::json;

use common::real::required_path;

/// A `llama-server` (and a router's per-model children, in its process group), killed on drop.
struct Server {
    base: String,
    child: Child,
    dir: PathBuf,
}

impl Server {
    fn spawn(bin: &Path, dir: PathBuf, mode_args: &[&str]) -> Server {
        std::fs::create_dir_all(&dir).unwrap();
        let port = common::free_port();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-np", "1", "-t", "1", "-tb", "1", "-c", "1024"])
            .args(mode_args)
            // A router would also list models from a Hugging Face cache; keep it to models-dir.
            .env("LLAMA_CACHE", dir.join("hf-cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Server {
            base: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status}; see {}",
                    self.base,
                    self.dir.display()
                );
            }
            let health = http.get(format!("{}/health", self.base)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "{} not ready in 30 s", self.base);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client(&self) -> HostClient {
        let config = HostConfig {
            name: "real".to_owned(),
            base_url: self.base.clone(),
            slots: 1,
            api_key: None,
            ..HostConfig::default()
        };
        HostClient::new(&config, http_client())
    }

    /// A short completion for `model`; returns once it is answered.
    async fn ask(base: String, model: &str) {
        let body = json!({"model": model, "max_tokens": 2,
                          "messages": [{"role": "user", "content": "hi"}]});
        let response = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("completion sent");
        assert!(response.status().is_success(), "{}", response.status());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM lets a router stop its children; SIGKILL the group for whatever is left.
        let group = format!("-{}", self.child.id());
        for signal in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("prix-residency-{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_shows_its_swaps_and_a_single_model_server_shows_nothing() {
    let bin = required_path("PRIX_LLAMA_SERVER");
    let gguf = required_path("PRIX_SMOLLM_GGUF");

    // The router: one GGUF under two names, one model at a time.
    let dir = scratch("router");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    for name in ["smol-a", "smol-b"] {
        let link = models.join(format!("{name}.gguf"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&gguf, link).unwrap();
    }
    let models_arg = models.to_str().unwrap().to_owned();
    let mut router = Server::spawn(
        &bin,
        dir,
        &["--models-dir", &models_arg, "--models-max", "1"],
    );
    router.wait_ready().await;
    let client = router.client();
    let probe = ResidencyProbe::new();

    let cold = client.read_residency(&probe).await.unwrap().unwrap();
    assert_eq!(cold.source, ResidencySource::LlamaRouter);
    assert!(
        cold.loaded.is_empty() && cold.loading.is_empty(),
        "{cold:?}"
    );
    // LM Studio's two listings answered 404: learnt, not asked again.
    assert!(probe.lacks(ResidencySource::LmStudioV1) && probe.lacks(ResidencySource::LmStudioV0));

    Server::ask(router.base.clone(), "smol-a").await;
    let warm = client.read_residency(&probe).await.unwrap().unwrap();
    assert_eq!(warm.loaded, ["smol-a"]);

    // Switch to smol-b: the router evicts smol-a and loads smol-b; the load (0.4 s or more on
    // this CPU) is seen as `loading` by reads every few milliseconds.
    let switch = tokio::spawn(Server::ask(router.base.clone(), "smol-b"));
    let mut saw_loading = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = client.read_residency(&probe).await.unwrap().unwrap();
        saw_loading |= now.loading == ["smol-b"];
        if now.loaded == ["smol-b"] {
            break;
        }
        assert!(Instant::now() < deadline, "smol-b never loaded: {now:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    switch.await.unwrap();
    assert!(
        saw_loading,
        "the router's load of smol-b was never seen as loading"
    );
    let after = client.read_residency(&probe).await.unwrap().unwrap();
    assert!(!after.is_loaded("smol-a"), "smol-a was evicted: {after:?}");
    drop(router);

    // A single-model server: /v1/models without status, no /api/* listings.
    let dir = scratch("single");
    let gguf_arg = gguf.to_str().unwrap().to_owned();
    let mut single = Server::spawn(&bin, dir, &["-m", &gguf_arg, "-a", "smol"]);
    single.wait_ready().await;
    let client = single.client();
    let probe = ResidencyProbe::new();
    assert_eq!(client.read_residency(&probe).await.unwrap(), None);
    assert!(!probe.may_tell(), "every listing learnt to be missing");
}
