//! Swap-aware scheduling against REAL model loads: two llama.cpp `llama-server` routers
//! (`--models-dir`, `--models-max 1`: LM-Studio-like JIT loading that holds one model at a time
//! and evicts it to load another) each list `smollm2-a` and `smollm2-b` (one SmolLM2-135M GGUF
//! under two names). Every switch on a router is a real load: a child `llama-server` is
//! spawned and reads the GGUF (about 0.4 s on this CPU).
//!
//! An interleaved battery (a, b, a, b, …) is submitted all at once to a [`Dispatcher`] with the
//! two hosts (one slot each, `max_loaded_models` 1, the default load prior). A load-blind
//! scheduler would hand a host whatever comes next and make it switch on most tasks; a
//! swap-aware one batches by model. The test counts the loads each router really made, from
//! the router's own log (one `spawning server instance with name=…` line per load) and from
//! its `/v1/models` `status.value` polled every 50 ms, and proves:
//! - every answer is generated text;
//! - the routers made at most [`MAX_LOADS`] loads in all (2 is the least: one model each);
//! - the two views of the loads agree with each other and with the order in which the
//!   dispatcher started tasks on each host (a router holding one model loads exactly when the
//!   model changes), so the count is the real one;
//! - no router ever held two models (the fixture really swaps) or was sent two requests at
//!   once (the dispatcher's Started-to-end windows per host never overlap; `/metrics` never
//!   shows a request deferred for want of a slot).
//!
//! Loads per router, the order each host ran, and the makespan are printed for the record.
//!
//! Like tests/real_backend.rs it needs `PRIX_LLAMA_SERVER` and `PRIX_SMOLLM_GGUF` (from
//! `scripts/real-backend.sh`, which `.ci/run` runs); without them it fails.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::real::{
    Run, Scratch, Server, ViewRef, assert_no_overlap, assert_real_answer, required_path, run,
};
use prix_dispatch::Dispatcher;
use prix_dispatch::config::{Config, ConfigSource, HostConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const A: &str = "smollm2-a";
const B: &str = "smollm2-b";
const MODELS: [&str; 2] = [A, B];
/// Loads the routers may make in all: one per router is the least (each must load the model it
/// serves); two more leave room for one rebalancing copy at the end of a backlog, which the
/// scheduler may judge worth its load. The load-blind placement (`swap_aware: false`), tried
/// once on this machine, made 6 and took twice the makespan.
const MAX_LOADS: usize = 4;
/// Short answers: the battery is about switches, not decoding.
const MAX_TOKENS: u64 = 8;
const PROMPTS: [&str; 14] = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "Name a planet of the solar system.",
    "What do bees make?",
    "Name a fruit.",
    "What is the opposite of hot?",
    "Name an animal that lives in the sea.",
    "What is water made of?",
    "What colour is the sky?",
    "Name a day of the week.",
    "What is the capital of Italy?",
    "Name a musical instrument.",
];
/// The router logs this, with the model's name, once per child it spawns, i.e. once per load
/// (checked against its `/v1/models` status below).
const LOAD_LINE: &str = "load: spawning server instance with name=";
const EVICT_LINE: &str = "evicting idle LRU name=";

fn loads_in_log(log: &str, model: &str) -> usize {
    let line = format!("{LOAD_LINE}{model} on port");
    log.lines().filter(|l| l.contains(&line)).count()
}

fn evictions_in_log(log: &str, model: &str) -> usize {
    let line = format!("{EVICT_LINE}{model} ");
    log.lines().filter(|l| l.contains(&line)).count()
}

/// A router's `/v1/models`: model id -> `status.value`.
async fn statuses(http: &reqwest::Client, base: &str) -> Option<BTreeMap<String, String>> {
    let body: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        body["data"]
            .as_array()?
            .iter()
            .filter_map(|m| {
                Some((
                    m["id"].as_str()?.to_owned(),
                    m["status"]["value"].as_str()?.to_owned(),
                ))
            })
            .collect(),
    )
}

/// In memory or on its way: a load has begun. (`sleeping` needs `--sleep-idle-seconds`, which
/// these routers do not have; were it to appear, waking would count as a load.)
fn held(status: &str) -> bool {
    matches!(status, "loading" | "loaded")
}

/// What one router's `/v1/models` showed over the run.
#[derive(Debug, Default)]
struct Residency {
    polls: usize,
    failed_polls: usize,
    last: BTreeMap<String, String>,
    /// Per model: transitions from not held to held (loading or loaded), i.e. loads begun.
    loads: BTreeMap<String, usize>,
    /// Most models held at once in one poll.
    max_held: usize,
    /// Status changes, (ms since the battery was submitted, model, new status), for the record.
    changes: Vec<(u128, String, String)>,
    /// Most requests a model's child held for want of a free slot (`/metrics`).
    max_deferred: f64,
}

/// Polls every router's `/v1/models` (and each model's `/metrics`) every 50 ms until `stop`.
fn spawn_residency_poller(
    routers: Vec<(String, String, Vec<Option<&'static str>>)>,
    seen: Arc<Mutex<BTreeMap<String, Residency>>>,
    t0: Instant,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let reads = routers.iter().map(|(host, base, views)| {
                let http = &http;
                async move {
                    let view = ViewRef { base, views };
                    let (now, deferred) = tokio::join!(statuses(http, base), view.deferred(http));
                    (host.clone(), now, deferred)
                }
            });
            for (host, now, deferred) in futures::future::join_all(reads).await {
                let mut all = seen.lock().unwrap();
                let router = all.entry(host).or_default();
                router.polls += 1;
                router.max_deferred = router.max_deferred.max(deferred);
                let Some(now) = now else {
                    router.failed_polls += 1;
                    continue;
                };
                router.max_held = router
                    .max_held
                    .max(now.values().filter(|s| held(s)).count());
                for (model, status) in now {
                    let before = router.last.get(&model).map(String::as_str);
                    if before == Some(status.as_str()) {
                        continue;
                    }
                    if held(&status) && !before.is_some_and(held) {
                        *router.loads.entry(model.clone()).or_default() += 1;
                    }
                    router
                        .changes
                        .push((t0.elapsed().as_millis(), model.clone(), status.clone()));
                    router.last.insert(model, status);
                }
            }
        }
    })
}

/// Per host, the models of the tasks it ran, in the order it started them.
fn order_per_host(runs: &[Run], t0: Instant) -> BTreeMap<String, Vec<(u128, &'static str)>> {
    let mut order: BTreeMap<String, Vec<(Instant, &'static str)>> = BTreeMap::new();
    for r in runs {
        let (host, started) = r.started.as_ref().expect("a Started event");
        order
            .entry(host.clone())
            .or_default()
            .push((*started, r.model));
    }
    order
        .into_iter()
        .map(|(host, mut starts)| {
            starts.sort();
            let starts = starts
                .into_iter()
                .map(|(at, model)| (at.duration_since(t0).as_millis(), model))
                .collect();
            (host, starts)
        })
        .collect()
}

/// Loads a host that holds one model at a time must make to run `models` in this order: the
/// first, and one per change of model.
fn implied_loads(models: &[&str]) -> usize {
    models
        .iter()
        .enumerate()
        .filter(|(i, m)| *i == 0 || models[i - 1] != **m)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interleaved_battery_makes_few_real_model_loads() {
    let t_setup = Instant::now();
    let llama_server = required_path("PRIX_LLAMA_SERVER");
    let gguf = required_path("PRIX_SMOLLM_GGUF");
    let scratch =
        Scratch(std::env::temp_dir().join(format!("prix-dispatch-swap-{}", std::process::id())));
    let models_dir = scratch.0.join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    std::fs::create_dir_all(scratch.0.join("hf-cache")).unwrap();
    // The router names each model after its file: two names, one GGUF.
    for name in MODELS {
        std::os::unix::fs::symlink(&gguf, models_dir.join(format!("{name}.gguf"))).unwrap();
    }
    let models_arg = models_dir.display().to_string();
    let router_args = ["--models-dir", models_arg.as_str(), "--models-max", "1"];
    let mut routers = vec![
        Server::spawn(
            "gpu0",
            &llama_server,
            &scratch.0,
            &router_args,
            vec![Some(A), Some(B)],
        ),
        Server::spawn(
            "gpu1",
            &llama_server,
            &scratch.0,
            &router_args,
            vec![Some(A), Some(B)],
        ),
    ];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for router in &mut routers {
        router.wait_ready(&http).await;
    }

    // Both routers list both models and hold neither: every load counted below is the battery's.
    for router in &routers {
        let now = statuses(&http, &router.base)
            .await
            .unwrap_or_else(|| panic!("{}: no /v1/models", router.host));
        assert_eq!(
            now.keys().map(String::as_str).collect::<Vec<_>>(),
            MODELS,
            "{}: {now:?}",
            router.host
        );
        assert!(
            now.values().all(|s| s == "unloaded"),
            "{}: a model is loaded before the battery: {now:?}",
            router.host
        );
    }

    let hosts = routers
        .iter()
        .map(|s| HostConfig {
            name: s.host.to_string(),
            base_url: s.base.clone(),
            slots: 1,
            api_key: None,
            // What `--models-max 1` is; also the default, said here because the test is about it.
            max_loaded_models: 1,
            ..HostConfig::default()
        })
        .collect();
    let dispatcher = Dispatcher::start(&Config::with_hosts(ConfigSource::Environment, hosts));
    // Let the dispatcher read both manifests (and residency) before the battery arrives, so
    // that it sees both hosts at once rather than placing the first tasks on whichever answered
    // first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = dispatcher.status().await.unwrap();
        if status.hosts.iter().all(|h| h.state.models.len() == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dispatcher did not read both manifests in 10 s: {:?}",
            status.hosts
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    let seen = Arc::new(Mutex::new(BTreeMap::<String, Residency>::new()));
    let stop = CancellationToken::new();
    let poller = spawn_residency_poller(
        routers
            .iter()
            .map(|s| (s.host.to_string(), s.base.clone(), s.views.clone()))
            .collect(),
        seen.clone(),
        t0,
        stop.clone(),
    );

    // The battery: a, b, a, b, … all submitted at once.
    let battery: Vec<(&'static str, &str)> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| (MODELS[i % 2], *p))
        .collect();
    let runs = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(
            battery
                .iter()
                .map(|(model, prompt)| run(&dispatcher, model, prompt, MAX_TOKENS)),
        ),
    )
    .await
    .expect("the battery finishes within 60 s");
    let makespan = runs.iter().map(|r| r.ended).max().unwrap() - t0;
    // One more poll period, so the poller's view includes the end state.
    tokio::time::sleep(Duration::from_millis(120)).await;
    stop.cancel();
    poller.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    // For the record, before any assertion: what ran where, in order, and what the routers did.
    let order = order_per_host(&runs, t0);
    for (r, (_, prompt)) in runs.iter().zip(&battery) {
        let result = r.result.as_ref().ok();
        eprintln!(
            "  {:5} {:10} {prompt:38} -> {:?} (started at {} ms, {:.0} ms, queued {:.0} ms)",
            result.map_or("?", |r| r.host.as_str()),
            r.model,
            result.map_or("", |r| r.text.as_str()),
            r.started
                .as_ref()
                .map_or(0, |(_, at)| at.duration_since(t0).as_millis()),
            result.map_or(0.0, |r| r.latency_ms),
            result.map_or(0.0, |r| r.queue_wait_ms),
        );
    }
    let mut log_loads: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for router in &routers {
        let log = router.log_text();
        let per_model: BTreeMap<&str, usize> =
            MODELS.iter().map(|m| (*m, loads_in_log(&log, m))).collect();
        let evictions: BTreeMap<&str, usize> = MODELS
            .iter()
            .map(|m| (*m, evictions_in_log(&log, m)))
            .collect();
        let residency = seen.get(router.host);
        eprintln!(
            "  {}: loads (log) {per_model:?}, evictions (log) {evictions:?}, loads (/v1/models) \
             {:?}; ran {:?}; status changes (ms, model, status) {:?}",
            router.host,
            residency.map(|r| &r.loads),
            order.get(router.host).map(|o| o
                .iter()
                .map(|(at, m)| format!("{at}:{m}"))
                .collect::<Vec<_>>()),
            residency.map(|r| &r.changes),
        );
        log_loads.insert(router.host, per_model);
    }
    let total_loads: usize = log_loads.values().flat_map(|m| m.values()).sum();
    let status = dispatcher.status().await.unwrap();
    for host in &status.hosts {
        eprintln!(
            "  dispatcher: {} resident {:?}, load_seconds {:.2}",
            host.state.name, host.state.resident_models, host.state.load_seconds
        );
    }
    eprintln!("  dispatcher: learned costs {:?}", status.costs);
    eprintln!(
        "real swap: {} tasks (a, b, a, b, …) on 2 routers holding one model each: {total_loads} \
         loads in all (least 2, allowed {MAX_LOADS}), makespan {makespan:?}, setup {:?}",
        runs.len(),
        t0 - t_setup
    );

    // Every answer is generated text, from a host that lists its model.
    for r in &runs {
        assert_real_answer(r);
    }
    // Both hosts worked: few loads by leaving one host idle would not be batching.
    assert_eq!(
        order.keys().map(String::as_str).collect::<Vec<_>>(),
        ["gpu0", "gpu1"],
        "both hosts served tasks: {order:?}"
    );
    // No host was sent a second request before the first ended ...
    assert_no_overlap(&runs);
    for router in &routers {
        let residency = seen
            .get(router.host)
            .unwrap_or_else(|| panic!("{} never polled", router.host));
        // ... the poller saw the routers throughout ...
        assert!(
            residency.polls >= 5 && residency.failed_polls * 10 <= residency.polls,
            "{}: /v1/models polls: {residency:?}",
            router.host
        );
        // ... and no model's child held a request for want of a free slot.
        assert_eq!(
            residency.max_deferred, 0.0,
            "{} held a request for want of a free slot: two were sent at once",
            router.host
        );
        // The fixture swaps: a router never held two models, so every switch was a load.
        assert!(
            residency.max_held <= 1,
            "{} held two models at once (is --models-max 1 honoured?): {residency:?}",
            router.host
        );
        // The count is the real one: the log, the router's status and the dispatcher's order
        // of starts on this host tell the same number of loads for each model.
        let from_log = &log_loads[router.host];
        let from_status: BTreeMap<&str, usize> = MODELS
            .iter()
            .map(|m| (*m, residency.loads.get(*m).copied().unwrap_or(0)))
            .collect();
        assert_eq!(
            &from_status, from_log,
            "{}: loads seen in /v1/models status vs load lines in its log",
            router.host
        );
        let ran: Vec<&str> = order
            .get(router.host)
            .map(|o| o.iter().map(|(_, m)| *m).collect())
            .unwrap_or_default();
        assert_eq!(
            implied_loads(&ran),
            from_log.values().sum::<usize>(),
            "{}: the loads its log shows vs the model changes in what it ran ({ran:?})",
            router.host
        );
    }
    // The point: batching by model, not a load per task.
    assert!(
        total_loads <= MAX_LOADS,
        "{total_loads} real model loads for {} interleaved tasks on 2 hosts (least 2, allowed \
         {MAX_LOADS}): {log_loads:?}; order per host {order:?}",
        runs.len()
    );
    assert!(
        total_loads >= 2,
        "each router must load the model it serves: {log_loads:?}"
    );

    dispatcher.shutdown();
    drop(routers);
}
