//! Real llama.cpp `llama-server` processes for the end-to-end tests (tests/real_*.rs): finding
//! the binary and the GGUF, spawning a server (single-model or router) that is killed on drop,
//! reading its `/slots` and `/metrics`, and running one completion through a [`Dispatcher`]
//! with what it streamed and when.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prix_dispatch::task::{CompletionResult, TaskEvent};
use prix_dispatch::{DispatchError, Dispatcher};
use serde_json::{Value, json};

use super::spec;

/// Dispatcher-side windows come from event receipt times in different tasks; on a CPU saturated
/// by the servers a task may observe its events a few milliseconds late. A real double dispatch
/// overlaps by a whole request (hundreds of ms here); the servers' own view has no tolerance.
pub const WINDOW_TOLERANCE: Duration = Duration::from_millis(50);

/// The llama-server binary or the SmolLM2 GGUF (`PRIX_LLAMA_SERVER`, `PRIX_SMOLLM_GGUF`): the
/// variable when set (what `scripts/real-backend.sh` prints), else where that script caches
/// it, under [`super::cache_dir`], so `cargo test` alone runs these tests after `.ci/run`.
pub fn required_path(var: &str) -> PathBuf {
    let in_cache = match var {
        "PRIX_LLAMA_SERVER" => "llama/llama-server",
        "PRIX_SMOLLM_GGUF" => "llama/SmolLM2-135M-Instruct.Q4_1.gguf",
        other => panic!("no cached place for {other}"),
    };
    let path = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| super::cache_dir().join(in_cache), PathBuf::from);
    assert!(
        path.is_file(),
        "no {var} at {}. This test runs real llama.cpp servers: run `bash .ci/run` once (it \
         builds them into $PRIX_CACHE, default ~/.cache/prix-dispatch; run the tests with the \
         same PRIX_CACHE), or `set -a; eval \"$(scripts/real-backend.sh)\"; set +a` and run the \
         test again in that shell",
        path.display()
    );
    path
}

/// Scratch space for models-dir and server logs; kept when the test fails, for the logs.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("server logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One `llama-server` process (with, in router mode, its per-model children), killed on drop
/// so that a failed assertion leaves nothing running.
pub struct Server {
    pub host: &'static str,
    pub base: String,
    pub log: PathBuf,
    /// The `?model=` each `/slots` and `/metrics` read needs: `None` for a single-model server,
    /// one per model for a router (it proxies these endpoints to the model's child).
    pub views: Vec<Option<&'static str>>,
    pub child: Child,
}

impl Server {
    pub fn spawn(
        host: &'static str,
        bin: &Path,
        scratch: &Path,
        mode_args: &[&str],
        views: Vec<Option<&'static str>>,
    ) -> Server {
        let port = super::free_port();
        let log = scratch.join(format!("{host}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(bin);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // One slot, one thread (two servers share this machine's two cores), small context.
            .args(["-np", "1", "-t", "1", "-tb", "1", "-c", "1024", "--metrics"])
            // Last, so that a test can ask for more slots (`-np 2`).
            .args(mode_args)
            // A router would also list models from a Hugging Face cache; keep it to models-dir.
            .env("LLAMA_CACHE", scratch.join("hf-cache"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group: the drop kills a router's children with it.
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Server {
            host,
            base: format!("http://127.0.0.1:{port}"),
            log,
            views,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} ({}) exited with {status} before answering /health:\n{}",
                    self.host,
                    self.base,
                    self.log_tail()
                );
            }
            let ok = http
                .get(format!("{}/health", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} ({}) did not answer /health within 30 s:\n{}",
                self.host,
                self.base,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn query(view: Option<&str>) -> String {
        view.map(|m| format!("?model={m}&autoload=false"))
            .unwrap_or_default()
    }

    pub fn endpoints(&self) -> ViewRef<'_> {
        ViewRef {
            base: &self.base,
            views: &self.views,
        }
    }

    pub async fn slots(&self, http: &reqwest::Client) -> Vec<(Option<&'static str>, Value)> {
        self.endpoints().slots(http).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The process group is the server and, for a router, the per-model children it spawned.
        // SIGTERM first (a router then stops and reaps its children), SIGKILL whatever is left.
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        signal("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_processing(slot: &Value) -> bool {
    slot["is_processing"].as_bool() == Some(true)
}

pub fn n_decoded(slot: &Value) -> u64 {
    slot["next_token"][0]["n_decoded"].as_u64().unwrap_or(0)
}

/// The endpoints of a [`Server`] without its process (the poller task owns copies).
pub struct ViewRef<'a> {
    pub base: &'a str,
    pub views: &'a [Option<&'static str>],
}

impl ViewRef<'_> {
    /// `GET /slots` of every view: (view, slot) for each slot. A router's model that is not
    /// loaded answers an error, which means no slot of it can be processing.
    pub async fn slots(&self, http: &reqwest::Client) -> Vec<(Option<&'static str>, Value)> {
        let reads = self.views.iter().map(|view| async move {
            let url = format!("{}/slots{}", self.base, Server::query(*view));
            let body: Option<Value> = match http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            body.and_then(|b| b.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .map(|slot| (*view, slot))
                .collect::<Vec<_>>()
        });
        futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// `llamacpp:requests_deferred` summed over the views: requests the server holds because
    /// every slot is busy. It can only be non-zero if two requests reached one server at once.
    pub async fn deferred(&self, http: &reqwest::Client) -> f64 {
        let reads = self.views.iter().map(|view| async move {
            let url = format!("{}/metrics{}", self.base, Server::query(*view));
            let text = match http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
                _ => String::new(),
            };
            text.lines()
                .filter(|l| l.starts_with("llamacpp:requests_deferred"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>()
        });
        futures::future::join_all(reads).await.into_iter().sum()
    }
}

/// One completion as the test saw it through the dispatcher.
#[derive(Debug)]
pub struct Run {
    pub model: &'static str,
    pub max_tokens: u64,
    pub started: Option<(String, Instant)>,
    pub first_delta: Option<Instant>,
    pub deltas: usize,
    pub streamed: String,
    pub ended: Instant,
    pub result: Result<CompletionResult, DispatchError>,
}

pub async fn run(
    dispatcher: &Dispatcher,
    model: &'static str,
    prompt: &str,
    max_tokens: u64,
) -> Run {
    let task = spec(
        model,
        prompt,
        json!({"temperature": 0.0, "max_tokens": max_tokens, "timeout_seconds": 30}),
    );
    let mut started = None;
    let mut first_delta = None;
    let mut deltas = 0;
    let mut streamed = String::new();
    let result = dispatcher
        .run(task, |event| match event {
            TaskEvent::Started { host, .. } => started = Some((host.clone(), Instant::now())),
            TaskEvent::Delta(text) => {
                first_delta.get_or_insert_with(Instant::now);
                deltas += 1;
                streamed.push_str(text);
            }
            _ => {}
        })
        .await;
    Run {
        model,
        max_tokens,
        started,
        first_delta,
        deltas,
        streamed,
        ended: Instant::now(),
        result,
    }
}

/// Generated text, not an echo, an empty answer or the simulator's `tok0 tok1 …`.
pub fn assert_real_answer(run: &Run) {
    let result = run
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("{} failed: {e:?}", run.model));
    let text = result.text.trim();
    assert!(
        !text.is_empty(),
        "empty answer from {}: {result:?}",
        result.host
    );
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() >= 2,
        "no words in {text:?}"
    );
    assert!(
        !text.contains("tok0"),
        "simulator output, not a model: {text:?}"
    );
    assert_eq!(result.model, run.model);
    assert!(
        matches!(result.finish_reason.as_deref(), Some("stop" | "length")),
        "{result:?}"
    );
    let usage = result
        .usage
        .expect("llama-server reports usage (stream_options.include_usage)");
    assert!(
        (1..=run.max_tokens).contains(&usage.completion_tokens),
        "completion_tokens {} outside 1..={}: {result:?}",
        usage.completion_tokens,
        run.max_tokens
    );
    assert_eq!(run.streamed, result.text, "the deltas add up to the answer");
    let (host, _) = run.started.as_ref().expect("a Started event");
    assert_eq!(host, &result.host);
}

/// No two windows [Started, end] on one host overlap (beyond the receipt jitter). Returns the
/// smallest gap between consecutive windows per host, in ms (negative = overlap within jitter).
pub fn assert_no_overlap(runs: &[Run]) -> BTreeMap<String, f64> {
    let mut by_host: BTreeMap<String, Vec<(Instant, Instant)>> = BTreeMap::new();
    for run in runs {
        let (host, start) = run.started.as_ref().unwrap();
        by_host
            .entry(host.clone())
            .or_default()
            .push((*start, run.ended));
    }
    let mut gaps = BTreeMap::new();
    for (host, mut windows) in by_host {
        windows.sort();
        let mut smallest = f64::INFINITY;
        for pair in windows.windows(2) {
            let ((_, a_end), (b_start, _)) = (pair[0], pair[1]);
            assert!(
                b_start + WINDOW_TOLERANCE >= a_end,
                "{host} started a task {:?} before the previous one ended",
                a_end - b_start
            );
            let gap = if b_start >= a_end {
                (b_start - a_end).as_secs_f64()
            } else {
                -(a_end - b_start).as_secs_f64()
            };
            smallest = smallest.min(gap * 1000.0);
        }
        gaps.insert(host, smallest);
    }
    gaps
}
