//! End to end against REAL inference servers: two llama.cpp `llama-server` processes running
//! SmolLM2-135M on this machine's CPU stand in for two GPU workstations.
//!
//! - `gpu0` is a single-model server listing `smollm2`.
//! - `gpu1` is a llama-server *router* (`--models-dir`, LM-Studio-like JIT loading) listing
//!   `smollm2` and `smollm2-b` (the same GGUF under two names): `smollm2-b` is on that host only.
//!   With `--models-max 2` it could run both models at once, so its `/slots` would show it if
//!   the dispatcher ever sent it two requests.
//!
//! Every server has one slot (`-np 1`), one thread, a small context. The dispatcher runs in
//! this process with one slot per host. The test proves, from the servers' own endpoints:
//! the answers are generated text; both hosts work; no server ever had two requests at once
//! (`/slots` never shows two slots processing, `/metrics` never shows a request deferred for
//! want of a slot); deltas stream before the end; dropping a task stops the generation on
//! the server; and the official `openai` package works against the OpenAI front door as
//! prompt-prix uses it.
//!
//! It needs `PRIX_LLAMA_SERVER` and `PRIX_SMOLLM_GGUF` (from `scripts/real-backend.sh`, which
//! `.ci/run` runs) and `PRIX_PYTHON` (a Python with `openai`); without them it fails.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::real::{
    Scratch, Server, ViewRef, WINDOW_TOLERANCE, assert_no_overlap, assert_real_answer,
    is_processing, n_decoded, required_path, run,
};
use common::{HttpFront, spec};
use prix_dispatch::Dispatcher;
use prix_dispatch::config::{Config, ConfigSource, HostConfig};
use prix_dispatch::task::TaskEvent;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Listed by both hosts.
const SHARED: &str = "smollm2";
/// Listed by `gpu1` only.
const ONLY_B: &str = "smollm2-b";

/// What the servers showed while the test ran, per host.
#[derive(Debug, Default)]
struct Observed {
    polls: usize,
    /// Polls that found a slot processing (the poller was not blind).
    busy_polls: usize,
    /// Most slots processing at once; counted only when two polls in a row agree, since a
    /// router's per-model reads are not atomic across models and a hand-over from one model to
    /// the next can fall between them.
    max_processing: usize,
    previous_processing: usize,
    /// Most slots processing in any single poll (reported, not asserted).
    max_processing_one_poll: usize,
    /// Most requests a server held for want of a free slot.
    max_deferred: f64,
    /// Tasks seen processing: (model view, llama-server task id) -> most tokens decoded.
    decoded: BTreeMap<(Option<&'static str>, i64), u64>,
}

/// Polls `/slots` and `/metrics` of every server every 20 ms until `stop`.
fn spawn_poller(
    servers: Vec<(String, String, Vec<Option<&'static str>>)>,
    observed: Arc<Mutex<BTreeMap<String, Observed>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.is_cancelled() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let reads = servers.iter().map(|(host, base, views)| {
                let http = &http;
                async move {
                    let view = ViewRef { base, views };
                    let (slots, deferred) = tokio::join!(view.slots(http), view.deferred(http));
                    (host.clone(), slots, deferred)
                }
            });
            for (host, slots, deferred) in futures::future::join_all(reads).await {
                let mut all = observed.lock().unwrap();
                let seen = all.entry(host).or_default();
                seen.polls += 1;
                let processing = slots.iter().filter(|(_, s)| is_processing(s)).count();
                if processing > 0 {
                    seen.busy_polls += 1;
                }
                let sustained = if processing > 1 {
                    processing.min(seen.previous_processing).max(1)
                } else {
                    processing
                };
                seen.max_processing = seen.max_processing.max(sustained);
                seen.max_processing_one_poll = seen.max_processing_one_poll.max(processing);
                seen.previous_processing = processing;
                seen.max_deferred = seen.max_deferred.max(deferred);
                for (view, slot) in slots.iter().filter(|(_, s)| is_processing(s)) {
                    if let Some(task) = slot["id_task"].as_i64() {
                        let entry = seen.decoded.entry((*view, task)).or_default();
                        *entry = (*entry).max(n_decoded(slot));
                    }
                }
            }
        }
    })
}

/// A long generation dropped after a few deltas.
struct Cancelled {
    host: String,
    dropped_at: Instant,
    /// (router model or `None`, llama-server `id_task`)
    task: (Option<&'static str>, i64),
    decoded_before_drop: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_servers_one_request_per_server() {
    let t0 = Instant::now();
    let llama_server = required_path("PRIX_LLAMA_SERVER");
    let gguf = required_path("PRIX_SMOLLM_GGUF");
    let python = common::installed(
        "PRIX_PYTHON",
        "venv/bin/python",
        "Python with the `openai` package",
    );

    let scratch =
        Scratch(std::env::temp_dir().join(format!("prix-dispatch-real-{}", std::process::id())));
    let models_dir = scratch.0.join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    std::fs::create_dir_all(scratch.0.join("hf-cache")).unwrap();
    // The router names each model after its file: two names, one GGUF.
    for name in [SHARED, ONLY_B] {
        std::os::unix::fs::symlink(&gguf, models_dir.join(format!("{name}.gguf"))).unwrap();
    }
    let gguf_arg = gguf.display().to_string();
    let models_arg = models_dir.display().to_string();
    let mut servers = vec![
        Server::spawn(
            "gpu0",
            &llama_server,
            &scratch.0,
            &["-m", &gguf_arg, "--alias", SHARED],
            vec![None],
        ),
        Server::spawn(
            "gpu1",
            &llama_server,
            &scratch.0,
            &["--models-dir", &models_arg, "--models-max", "2"],
            vec![Some(SHARED), Some(ONLY_B)],
        ),
    ];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for server in &mut servers {
        server.wait_ready(&http).await;
    }
    let ready = t0.elapsed();

    // What the servers themselves list.
    for (server, expected) in servers.iter().zip([vec![SHARED], vec![SHARED, ONLY_B]]) {
        let body: Value = http
            .get(format!("{}/v1/models", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut ids: Vec<&str> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, expected, "{}: {body}", server.host);
    }

    let hosts = servers
        .iter()
        .map(|s| HostConfig {
            name: s.host.to_string(),
            base_url: s.base.clone(),
            slots: 1,
            api_key: None,
            ..HostConfig::default()
        })
        .collect();
    let dispatcher = Dispatcher::start(&Config::with_hosts(ConfigSource::Environment, hosts));

    let observed = Arc::new(Mutex::new(BTreeMap::<String, Observed>::new()));
    let stop_polling = CancellationToken::new();
    let poller = spawn_poller(
        servers
            .iter()
            .map(|s| (s.host.to_string(), s.base.clone(), s.views.clone()))
            .collect(),
        observed.clone(),
        stop_polling.clone(),
    );

    // 1. Fan-out: 8 of the shared model, 2 of the model only gpu1 lists, one longer answer,
    //    all submitted at once.
    let t_fan = Instant::now();
    let prompts = [
        "What is the capital of France?",
        "Name a primary colour.",
        "What is two plus two?",
        "Say hello in Spanish.",
        "Name a planet of the solar system.",
        "What do bees make?",
        "Name a fruit.",
        "What is the opposite of hot?",
    ];
    let mut jobs: Vec<(&'static str, String, u64)> = prompts
        .iter()
        .map(|p| (SHARED, p.to_string(), 16))
        .collect();
    jobs.push((ONLY_B, "Name an animal that lives in the sea.".into(), 16));
    jobs.push((ONLY_B, "What is water made of?".into(), 16));
    jobs.push((SHARED, "Write a short poem about the sea.".into(), 48));
    let runs = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(
            jobs.iter()
                .map(|(model, prompt, max)| run(&dispatcher, model, prompt, *max)),
        ),
    )
    .await
    .expect("the fan-out finishes within 60 s");
    let fan_out = t_fan.elapsed();
    for (r, (_, prompt, _)) in runs.iter().zip(&jobs) {
        let result = r.result.as_ref().ok();
        eprintln!(
            "  {:5} {:10} {prompt:40} -> {:?} ({} deltas, {:?}, {:.0} ms)",
            result.map_or("?", |r| r.host.as_str()),
            r.model,
            result.map_or("", |r| r.text.as_str()),
            r.deltas,
            result.and_then(|r| r.finish_reason.clone()),
            result.map_or(0.0, |r| r.latency_ms),
        );
    }
    for r in &runs {
        assert_real_answer(r);
    }
    let hosts_used: BTreeMap<&str, usize> = runs.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.result.as_ref().unwrap().host.as_str())
            .or_default() += 1;
        m
    });
    assert_eq!(
        hosts_used.keys().copied().collect::<Vec<_>>(),
        ["gpu0", "gpu1"],
        "both hosts served work: {hosts_used:?}"
    );
    for r in runs.iter().filter(|r| r.model == ONLY_B) {
        assert_eq!(
            r.result.as_ref().unwrap().host,
            "gpu1",
            "only gpu1 lists {ONLY_B}"
        );
    }
    let gaps = assert_no_overlap(&runs);
    // Streaming: the longer answer came as many deltas, the first well before the end.
    let poem = runs.last().unwrap();
    let first = poem.first_delta.expect("deltas arrived");
    assert!(poem.deltas > 1, "{poem:?}");
    assert!(
        poem.ended.duration_since(first) > Duration::from_millis(50),
        "the first delta came only at the end: {:?} before",
        poem.ended.duration_since(first)
    );

    // 2. Cancellation: two long generations, one on each host (the model only gpu1 lists goes
    //    there; the shared one goes to gpu0, which holds it: swap-aware placement would rather
    //    wait for a warm host than load it beside); drop each handle after a few deltas; the
    //    servers must stop generating. The model only gpu1 lists is sent first: a llama-server
    //    that marks its slot idle late (a loaded CI machine) is held back as busy from
    //    elsewhere for a moment, and the shared task would take gpu1 in the meantime (that a
    //    follow-up finds its slot free is tests/follow_up_placement.rs).
    let t_cancel = Instant::now();
    let long = "Tell me a very long story about a dragon who learns to cook. Describe every \
                meal in detail.";
    let servers_ref = &servers;
    let http_ref = &http;
    let cancelled: Vec<Cancelled> = futures::future::join_all([ONLY_B, SHARED].map(|model| {
        let task = spec(
            model,
            long,
            json!({"temperature": 0.0, "max_tokens": 2000, "timeout_seconds": 30}),
        );
        let mut handle = dispatcher.submit(task).expect("accepted");
        async move {
            let mut host = None;
            let mut deltas = 0;
            while deltas < 4 {
                match tokio::time::timeout(Duration::from_secs(30), handle.next()).await {
                    Ok(Some(TaskEvent::Started { host: h, .. })) => host = Some(h),
                    Ok(Some(TaskEvent::Delta(_))) => deltas += 1,
                    Ok(Some(TaskEvent::Finished(r))) => {
                        panic!("finished before the cancel: {r:?}")
                    }
                    Ok(Some(TaskEvent::Failed(e))) => panic!("failed before the cancel: {e:?}"),
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the task ended without an event"),
                    Err(_) => panic!("no delta within 30 s"),
                }
            }
            let host = host.expect("a Started event");
            // The server's own id for this generation, while it runs.
            let server = servers_ref.iter().find(|s| s.host == host).unwrap();
            let running: Vec<(Option<&'static str>, Value)> = server
                .slots(http_ref)
                .await
                .into_iter()
                .filter(|(_, s)| is_processing(s))
                .collect();
            assert_eq!(running.len(), 1, "{host}: {running:?}");
            let (view, slot) = &running[0];
            assert_eq!(slot["params"]["n_predict"], 2000, "{slot}");
            drop(handle);
            Cancelled {
                host,
                dropped_at: Instant::now(),
                task: (*view, slot["id_task"].as_i64().unwrap()),
                decoded_before_drop: n_decoded(slot),
            }
        }
    }))
    .await;
    let mut cancel_hosts: Vec<&str> = cancelled.iter().map(|c| c.host.as_str()).collect();
    cancel_hosts.sort_unstable();
    assert_eq!(cancel_hosts, ["gpu0", "gpu1"], "one long task per host");
    let mut stop_times = Vec::new();
    for Cancelled {
        host, dropped_at, ..
    } in &cancelled
    {
        let server = servers.iter().find(|s| s.host == host).unwrap();
        let idle_after = loop {
            let busy = server
                .slots(&http)
                .await
                .iter()
                .any(|(_, slot)| is_processing(slot));
            if !busy {
                break dropped_at.elapsed();
            }
            assert!(
                dropped_at.elapsed() < Duration::from_secs(2),
                "{host} still generating 2 s after the task was dropped:\n{}",
                server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        stop_times.push((host.clone(), idle_after));
    }
    // ... and stays idle: nothing resumed the generation.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for server in &servers {
        let busy: Vec<Value> = server
            .slots(&http)
            .await
            .into_iter()
            .filter(|(_, s)| is_processing(s))
            .map(|(_, s)| s)
            .collect();
        assert!(busy.is_empty(), "{}: {busy:?}", server.host);
        assert!(
            server.log_text().contains("cancel task"),
            "{}'s log shows no cancelled task:\n{}",
            server.host,
            server.log_tail()
        );
    }
    let cancel_phase = t_cancel.elapsed();

    // 3. The OpenAI-compatible front door, driven by the official `openai` package the way
    //    prompt-prix drives a server.
    let t_py = Instant::now();
    let front = HttpFront::start(&dispatcher, None, 1 << 20).await;
    let driver =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/prompt_prix_driver.py");
    let base = front.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(driver)
            .arg(base)
            .arg(SHARED)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprint!(
        "{}",
        stdout
            .lines()
            .map(|l| format!("  py: {l}\n"))
            .collect::<String>()
    );
    assert!(
        output.status.success(),
        "prompt_prix_driver.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("prompt-prix driver: ok"), "{stdout}");
    let py_phase = t_py.elapsed();
    drop(front);

    // 4. What the servers showed throughout.
    stop_polling.cancel();
    poller.await.unwrap();
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    for server in &servers {
        let seen = observed
            .get(server.host)
            .unwrap_or_else(|| panic!("{} never polled", server.host));
        eprintln!(
            "  {}: {} polls, {} busy, at most {} slot(s) processing ({} in one poll), at most {} \
             deferred, {} tasks seen",
            server.host,
            seen.polls,
            seen.busy_polls,
            seen.max_processing,
            seen.max_processing_one_poll,
            seen.max_deferred,
            seen.decoded.len()
        );
        assert!(
            seen.busy_polls >= 3,
            "{}: the poller never saw work: {seen:?}",
            server.host
        );
        assert!(
            seen.max_processing <= 1,
            "{} processed two requests at once: {seen:?}",
            server.host
        );
        assert_eq!(
            seen.max_deferred, 0.0,
            "{} held a request for want of a free slot: two were sent at once",
            server.host
        );
    }
    // The cancelled generations: the servers decoded a few tokens of the 2000 asked for.
    let mut decoded = Vec::new();
    for c in &cancelled {
        let most = observed[c.host.as_str()]
            .decoded
            .get(&c.task)
            .copied()
            .unwrap_or(c.decoded_before_drop)
            .max(c.decoded_before_drop);
        assert!(
            most < 2000,
            "{}: generation {:?} decoded {most} tokens: the cancel did not stop it",
            c.host,
            c.task
        );
        decoded.push(format!(
            "{} {} at the drop, {most} in all",
            c.host, c.decoded_before_drop
        ));
    }

    dispatcher.shutdown();
    drop(servers);
    eprintln!(
        "real backend: servers ready in {ready:?}; fan-out of {} in {fan_out:?} (smallest gap \
         between one host's tasks, ms: {gaps:.1?}); cancel phase \
         {cancel_phase:?} (slots idle after {stop_times:?}; tokens of 2000 decoded: \
         {decoded:?}); openai driver {py_phase:?}; total {:?}",
        runs.len(),
        t0.elapsed()
    );
}

/// A llama-server with two slots, configured as a one-slot GPU, busy with a request sent around
/// the daemon (another dispatcher, a person with curl): the daemon sends nothing until that
/// request ends, says so in its status, then serves. Judged from the server's own `/slots`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_busy_with_a_request_from_elsewhere_gets_no_second_one() {
    let llama_server = required_path("PRIX_LLAMA_SERVER");
    let gguf = required_path("PRIX_SMOLLM_GGUF");
    let scratch = Scratch(
        std::env::temp_dir().join(format!("prix-dispatch-elsewhere-{}", std::process::id())),
    );
    std::fs::create_dir_all(scratch.0.join("hf-cache")).unwrap();
    let gguf_arg = gguf.display().to_string();
    let mut server = Server::spawn(
        "gpu0",
        &llama_server,
        &scratch.0,
        &["-m", &gguf_arg, "--alias", SHARED, "-np", "2"],
        vec![None],
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    server.wait_ready(&http).await;
    let dispatcher = Dispatcher::start(&Config::with_hosts(
        ConfigSource::Environment,
        vec![HostConfig {
            name: "gpu0".into(),
            base_url: server.base.clone(),
            slots: 1,
            api_key: None,
            ..HostConfig::default()
        }],
    ));
    // Warm the model and let the daemon learn that this host shows its slots.
    assert_real_answer(&run(&dispatcher, SHARED, "Say hi.", 4).await);

    // The request from elsewhere: long enough to be seen, on the server's first slot.
    let foreign = tokio::spawn({
        let (http, base) = (http.clone(), server.base.clone());
        async move {
            let answer = http
                .post(format!("{base}/v1/chat/completions"))
                .json(
                    &json!({"model": SHARED, "max_tokens": 120, "temperature": 0.0,
                    "ignore_eos": true,
                    "messages": [{"role": "user", "content": "Count from one to one hundred."}]}),
                )
                .send()
                .await
                .expect("the foreign request is answered");
            assert!(answer.status().is_success());
            Instant::now()
        }
    });
    let processing = |slots: &[(Option<&'static str>, Value)]| {
        slots.iter().filter(|(_, s)| is_processing(s)).count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while processing(&server.slots(&http).await) == 0 {
        assert!(
            Instant::now() < deadline,
            "the foreign request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Ours, while it runs; the server's slots are watched all along.
    let watching = CancellationToken::new();
    let peak = tokio::spawn({
        let (http, base, stop) = (http.clone(), server.base.clone(), watching.clone());
        async move {
            let view = ViewRef {
                base: &base,
                views: &[None],
            };
            let mut peak = 0;
            while !stop.is_cancelled() {
                let slots = view.slots(&http).await;
                peak = peak.max(slots.iter().filter(|(_, s)| is_processing(s)).count());
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            peak
        }
    });
    let ours = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { run(&dispatcher, SHARED, "Name a colour.", 8).await }
    });
    // The daemon sees the host busy from elsewhere and holds the task.
    let mut seen_busy = false;
    for _ in 0..100 {
        let status = dispatcher.status().await.unwrap();
        if status.hosts[0].state.busy_elsewhere == 1 && status.queued_total == 1 {
            seen_busy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let foreign_ended = foreign.await.unwrap();
    let ours = ours.await.unwrap();
    watching.cancel();
    let peak = peak.await.unwrap();
    assert!(
        seen_busy,
        "dispatch_status said the host was busy from elsewhere"
    );
    assert_real_answer(&ours);
    let (_, started) = ours.started.clone().expect("ours started");
    assert!(
        started + WINDOW_TOLERANCE >= foreign_ended,
        "ours was sent {:?} before the foreign request ended",
        foreign_ended.duration_since(started)
    );
    assert_eq!(
        peak, 1,
        "the server never had two requests at once (its /slots)"
    );
    assert_eq!(
        dispatcher.status().await.unwrap().hosts[0]
            .state
            .busy_elsewhere,
        0
    );
    dispatcher.shutdown();
}
