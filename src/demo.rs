//! `prix-dispatch demo`: a battery on two simulated GPUs, scheduled for real, in seconds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::config::{Config, ConfigSource, HostConfig};
use crate::dispatcher::Dispatcher;
use crate::sim::{Behaviour, SimConfig, SimHost};
use crate::task::CompletionRequest;

pub struct DemoPlan {
    pub a_tasks: usize,
    pub b_tasks: usize,
    pub task_ms: u64,
}

const MODEL_A: &str = "qwen2.5-7b-instruct";
const MODEL_B: &str = "llama-3.1-8b-instruct";
/// Each simulated answer is this many tokens, spread over the task's duration.
const TOKENS: usize = 10;

/// Lower bound on the makespan: for every set of models, their work divided by the slots of
/// the hosts that can run any of them; and no task shorter than the longest one.
/// `hosts`: (slots, models). Exponential in the number of models; fine up to ~16.
pub fn makespan_lower_bound(
    hosts: &[(usize, Vec<String>)],
    work: &BTreeMap<String, Duration>,
    longest: Duration,
) -> Duration {
    let models: Vec<&String> = work.keys().collect();
    let mut bound = longest;
    for mask in 1u32..(1 << models.len()) {
        let chosen: Vec<&String> = (0..models.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| models[i])
            .collect();
        let total: Duration = chosen.iter().map(|m| work[*m]).sum();
        let slots: usize = hosts
            .iter()
            .filter(|(_, listed)| chosen.iter().any(|m| listed.contains(m)))
            .map(|(s, _)| *s)
            .sum();
        if slots > 0 {
            bound = bound.max(total / slots as u32);
        }
    }
    bound
}

struct Run {
    makespan: Duration,
    /// The lower bound for the durations the hosts actually recorded.
    ideal: Duration,
    per_host: Vec<(String, String, usize)>,
}

pub async fn run(plan: DemoPlan) -> anyhow::Result<String> {
    let mut out = String::new();
    let (a, b) = (plan.a_tasks, plan.b_tasks);
    let hosts = [
        ("gpu0", vec![MODEL_A.to_string(), MODEL_B.to_string()]),
        ("gpu1", vec![MODEL_A.to_string()]),
    ];

    let _ = writeln!(out, "prix-dispatch demo: two simulated GPUs, one slot each");
    let _ = writeln!(out, "  gpu0 serves {MODEL_A} and {MODEL_B}");
    let _ = writeln!(out, "  gpu1 serves {MODEL_A} only");
    let _ = writeln!(
        out,
        "battery: {a} x {MODEL_A}, then {b} x {MODEL_B}, {} ms each, all submitted at once\n",
        plan.task_ms
    );

    let placed = battery(&hosts, &plan, Duration::from_secs(30)).await?;
    let fifo = battery(&hosts, &plan, Duration::ZERO).await?;

    let _ = writeln!(
        out,
        "host   tasks  peak  order (A = {MODEL_A}, B = {MODEL_B})"
    );
    for (name, order, peak) in &placed.per_host {
        let _ = writeln!(out, "{name:<6} {:>5}  {peak:>4}  {order}", order.len());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |run: &Run| run.ideal.as_secs_f64() / run.makespan.as_secs_f64();
    let _ = writeln!(
        out,
        "\nmakespan {:.0} ms; ideal {:.0} ms; efficiency {:.2} of ideal",
        ms(placed.makespan),
        ms(placed.ideal),
        ratio(&placed)
    );
    let _ = writeln!(
        out,
        "plain FIFO (upstream's dispatcher, max_bypass_seconds = 0): {:.0} ms; ideal {:.0} ms; {:.2} of ideal",
        ms(fifo.makespan),
        ms(fifo.ideal),
        ratio(&fifo)
    );
    let _ = writeln!(
        out,
        "(ideal: the lower bound for the task durations the simulated hosts recorded)"
    );
    let peak = placed
        .per_host
        .iter()
        .map(|(_, _, p)| *p)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "peak requests in flight on any one GPU: {peak} (never two on one GPU)"
    );
    swapping(&mut out, &plan).await?;
    Ok(out)
}

/// Models of the switching battery.
const SWAP_MODELS: [&str; 4] = [
    "qwen2.5-7b-instruct",
    "llama-3.1-8b-instruct",
    "gemma-2-9b-it",
    "mistral-7b-instruct",
];

/// The second battery: GPUs that hold one model at a time and pay for every switch.
async fn swapping(out: &mut String, plan: &DemoPlan) -> anyhow::Result<()> {
    const TESTS: usize = 6;
    let load_ms = plan.task_ms * 5;
    let _ = writeln!(
        out,
        "\nGPUs that hold one model at a time (LM Studio's JIT auto-evict): two simulated GPUs, \
         each listing {} models and holding none;\nloading a model takes {load_ms} ms, a task \
         {} ms; {TESTS} tests x {} models sent test by test (A B C D A B C D ...)\n",
        SWAP_MODELS.len(),
        plan.task_ms,
        SWAP_MODELS.len()
    );
    let _ = writeln!(
        out,
        "placement                      makespan  loads per GPU  of bound"
    );
    let work = plan.task_ms as f64 * (TESTS * SWAP_MODELS.len()) as f64;
    // Every model loads once somewhere; both GPUs load at least once: (work + 4 loads) / 2.
    let bound = (work + (SWAP_MODELS.len() * load_ms as usize) as f64) / 2.0;
    for (label, strategy) in [
        ("swap-aware (prix-dispatch)", Strategy::SwapAware),
        ("load-blind (before)", Strategy::LoadBlind),
        ("model by model (prompt-prix)", Strategy::Gated),
    ] {
        let (makespan, loads, peak) =
            switching_battery(plan.task_ms, load_ms, TESTS, strategy).await?;
        let ms = makespan.as_secs_f64() * 1e3;
        let _ = writeln!(
            out,
            "{label:<30} {ms:>6.0} ms  {:<13}  {:.2}{}",
            loads
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            bound / ms,
            if peak > 1 { "  (TWO AT ONCE?)" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "(loads counted by the simulated GPUs; bound: all work plus one load per model, over two GPUs)"
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Strategy {
    SwapAware,
    LoadBlind,
    /// The client sends one model's tasks at a time and waits for them (prompt-prix's gate).
    Gated,
}

/// Runs the switching battery; returns (makespan, loads per GPU, peak requests on a GPU).
async fn switching_battery(
    task_ms: u64,
    load_ms: u64,
    tests: usize,
    strategy: Strategy,
) -> anyhow::Result<(Duration, Vec<u64>, usize)> {
    let behaviour = Behaviour {
        tokens: TOKENS,
        token_interval_ms: task_ms / TOKENS as u64,
        load_ms,
        ..Behaviour::default()
    };
    let mut sims = Vec::new();
    for _ in 0..2 {
        sims.push(
            SimHost::start(SimConfig {
                models: SWAP_MODELS.iter().map(|m| m.to_string()).collect(),
                max_loaded_models: Some(1),
                default: behaviour.clone(),
                ..SimConfig::default()
            })
            .await?,
        );
    }
    let mut config = Config::with_hosts(
        ConfigSource::Environment,
        sims.iter()
            .enumerate()
            .map(|(i, sim)| HostConfig {
                name: format!("gpu{i}"),
                base_url: sim.url(),
                ..HostConfig::default()
            })
            .collect(),
    );
    config.queue.swap_aware = strategy == Strategy::SwapAware;
    let dispatcher = Dispatcher::start(&config);
    let send = |model: &'static str| {
        let dispatcher = dispatcher.clone();
        async move {
            let request: CompletionRequest = serde_json::from_value(json!({
                "model_id": model,
                "messages": [{"role": "user", "content": "Say hello."}],
            }))?;
            let spec = request.into_spec()?;
            anyhow::Ok(dispatcher.run(spec, |_| {}).await?)
        }
    };
    let started = Instant::now();
    if strategy == Strategy::Gated {
        for model in SWAP_MODELS {
            for r in futures::future::join_all((0..tests).map(|_| send(model))).await {
                r?;
            }
        }
    } else {
        let order = (0..tests).flat_map(|_| SWAP_MODELS);
        for r in futures::future::join_all(order.map(send)).await {
            r?;
        }
    }
    let makespan = started.elapsed();
    dispatcher.shutdown();
    let mut loads = Vec::new();
    let mut peak = 0;
    for sim in sims {
        let stats = sim.stats();
        loads.push(stats.loads);
        peak = peak.max(stats.peak_in_flight);
        sim.shutdown().await;
    }
    Ok((makespan, loads, peak))
}

async fn battery(
    hosts: &[(&str, Vec<String>)],
    plan: &DemoPlan,
    max_bypass: Duration,
) -> anyhow::Result<Run> {
    let behaviour = Behaviour {
        tokens: TOKENS,
        token_interval_ms: plan.task_ms / TOKENS as u64,
        ..Behaviour::default()
    };
    let mut sims = Vec::new();
    for (_, models) in hosts {
        sims.push(
            SimHost::start(SimConfig {
                models: models.clone(),
                default: behaviour.clone(),
                ..SimConfig::default()
            })
            .await?,
        );
    }
    let mut config = Config::with_hosts(
        ConfigSource::Environment,
        hosts
            .iter()
            .zip(&sims)
            .map(|((name, _), sim)| HostConfig {
                name: name.to_string(),
                base_url: sim.url(),
                slots: 1,
                api_key: None,
                ..HostConfig::default()
            })
            .collect(),
    );
    config.queue.max_bypass = max_bypass;
    // Upstream's dispatcher knew nothing of loads either.
    config.queue.swap_aware = !max_bypass.is_zero();
    let dispatcher = Dispatcher::start(&config);
    let started = Instant::now();
    let models = std::iter::repeat_n(MODEL_A, plan.a_tasks)
        .chain(std::iter::repeat_n(MODEL_B, plan.b_tasks));
    let runs = models.map(|model| {
        let dispatcher = dispatcher.clone();
        async move {
            let request: CompletionRequest = serde_json::from_value(json!({
                "model_id": model,
                "messages": [{"role": "user", "content": "Say hello."}],
            }))?;
            let spec = request.into_spec()?;
            anyhow::Ok(dispatcher.run(spec, |_| {}).await?)
        }
    });
    let results = futures::future::join_all(runs).await;
    let makespan = started.elapsed();
    for r in results {
        r?;
    }
    dispatcher.shutdown();
    let mut per_host = Vec::new();
    let mut work: BTreeMap<String, Duration> = BTreeMap::new();
    let mut longest = Duration::ZERO;
    for ((name, _), sim) in hosts.iter().zip(sims) {
        let mut records = sim.chat_records();
        records.sort_by_key(|r| r.start_us);
        for r in &records {
            let took = Duration::from_micros(r.end_us.unwrap_or(r.start_us) - r.start_us);
            *work.entry(r.model.clone().unwrap_or_default()).or_default() += took;
            longest = longest.max(took);
        }
        let order: String = records
            .iter()
            .map(|r| {
                if r.model.as_deref() == Some(MODEL_B) {
                    'B'
                } else {
                    'A'
                }
            })
            .collect();
        per_host.push((name.to_string(), order, sim.stats().peak_in_flight));
        sim.shutdown().await;
    }
    let shape: Vec<(usize, Vec<String>)> = hosts.iter().map(|(_, m)| (1, m.clone())).collect();
    let ideal = makespan_lower_bound(&shape, &work, longest);
    Ok(Run {
        makespan,
        ideal,
        per_host,
    })
}
