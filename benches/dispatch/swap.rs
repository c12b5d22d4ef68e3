//! Section `swap`: batteries on hosts that pay for switching models.
//!
//! Every host has one slot, lists every model, holds one model at a time (LM Studio's JIT
//! auto-evict, llama-server's router with `--models-max 1`, Ollama with one loaded model) and
//! holds none at the start; a task of a model the host does not hold first pays the load. A
//! discrete-event simulation in virtual time drives the real `DispatchState` (first bytes,
//! completions with their timings, manifest reports that say what is loaded); the loads are
//! counted from the simulated hosts, not from the scheduler's belief.
//!
//! Compared in the same run, on the same batteries:
//! - **swap-aware**: today's placement;
//! - **load-blind**: the placement before it (scarcest model, oldest task; `swap_aware: false`);
//! - **gated**: prompt-prix's own workaround, client-side — one model's tasks at a time with a
//!   barrier between models (each batch on the load-blind placement).
//!
//! Lower bound (after shared/reference/placement.md): every model must be loaded at least once,
//! on some host, and every host that runs anything loads at least once (all start empty); all
//! work and loads share the hosts that are used, and using fewer hosts only raises the bound,
//! so with `H` hosts, `M` models, total work `W` and load time `L`:
//! `makespan ≥ max((W + max(M, H)·L) / H, max_t p_t + L)`.
//! Minimum loads: `M` (each model once); using every host needs `max(M, H)`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use prix_dispatch::scheduler::costs::Observed;
use prix_dispatch::scheduler::state::{
    Decision, DispatchState, HostId, HostSignal, Limits, ManifestReport, Outcome, Release,
};
use prix_dispatch::task::TaskId;
use tokio::time::Instant;

use super::{Job, Rng, fmt_spread, model_names};

/// How a battery reaches the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A B C D A B C D …: a fan-out client or several agents.
    TestByTest,
    /// A A … B B …, all at once.
    ModelByModel,
    /// Two clients at once, each test by test, one in the reverse model order.
    TwoClients,
}

/// (model index, work) per task, in submission order.
fn battery(
    models: usize,
    tests: usize,
    mean: Duration,
    order: Order,
    seed: u64,
) -> Vec<(usize, Duration)> {
    let mut rng = Rng::new(seed);
    let mut work = |_: usize| {
        // Log-normal, sigma 0.5, mean `mean`.
        let f = (0.5 * rng.normal() - 0.125).exp();
        Duration::from_secs_f64((mean.as_secs_f64() * f).clamp(0.05, 600.0))
    };
    let mut out = Vec::new();
    match order {
        Order::TestByTest => {
            for t in 0..tests {
                for m in 0..models {
                    out.push((m, work(t)));
                }
            }
        }
        Order::ModelByModel => {
            for m in 0..models {
                for t in 0..tests {
                    out.push((m, work(t)));
                }
            }
        }
        Order::TwoClients => {
            let half = tests / 2;
            for t in 0..half {
                for m in 0..models {
                    out.push((m, work(t)));
                    out.push((models - 1 - m, work(t)));
                }
            }
        }
    }
    out
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct SwapResult {
    pub makespan: Duration,
    pub loads: usize,
    pub slot_violations: u64,
    pub model_violations: u64,
    pub completed: usize,
}

/// (task id, model, believed cold, first-token time, service time).
type Running = (u64, usize, bool, Duration, Duration);

/// (when, sequence, kind: 0 first byte / 1 completion, host, task id).
type Event = (Instant, u64, u8, usize, u64);

pub(crate) struct Sim {
    state: DispatchState<Job>,
    pub(crate) now: Instant,
    /// When each task ended (by id).
    pub(crate) ended: std::collections::HashMap<u64, Instant>,
    /// When each task started (by id).
    pub(crate) started: std::collections::HashMap<u64, Instant>,
    load: Duration,
    resident: Vec<Option<usize>>,
    /// (when, seq, kind, host, task id): kind 0 = first byte, 1 = completion.
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    /// Per host, what runs there.
    running: Vec<Vec<Running>>,
    names: Vec<Arc<str>>,
    result: SwapResult,
}

impl Sim {
    pub(crate) fn new(
        hosts: usize,
        models: usize,
        load: Duration,
        swap_aware: bool,
        t0: Instant,
    ) -> Sim {
        Sim::holding(hosts, models, load, swap_aware, t0, None)
    }

    /// Hosts that hold model `resident` at the start (none with `None`).
    pub(crate) fn holding(
        hosts: usize,
        models: usize,
        load: Duration,
        swap_aware: bool,
        t0: Instant,
        resident: Option<usize>,
    ) -> Sim {
        let names = model_names(models);
        let state = DispatchState::new(
            (0..hosts).map(|i| (format!("h{i}"), 1)),
            Limits {
                max_pending: 1_000_000,
                swap_aware,
                ..Limits::default()
            },
        );
        let mut sim = Sim {
            state,
            now: t0,
            ended: Default::default(),
            started: Default::default(),
            load,
            resident: vec![resident; hosts],
            events: BinaryHeap::new(),
            seq: 0,
            running: vec![Vec::new(); hosts],
            names,
            result: SwapResult::default(),
        };
        let d = sim.state.start();
        sim.apply(d);
        let names_for_report: Vec<String> = sim.names.iter().map(|n| n.to_string()).collect();
        let reports = (0..hosts)
            .map(|i| ManifestReport {
                host: HostId(i),
                models: Ok(sim.names.iter().map(|n| n.to_string()).collect()),
                loaded: Some(
                    resident
                        .map(|k| vec![names_for_report[k].clone()])
                        .unwrap_or_default(),
                ),
            })
            .collect();
        let d = sim.state.manifests_read(reports, t0);
        sim.apply(d);
        for i in 0..hosts {
            let d = sim.state.worker_idle(HostId(i), t0);
            sim.apply(d);
        }
        sim
    }

    fn submit(&mut self, id: u64, kind: usize, work: Duration) {
        self.submit_from(id, kind, work, "bench", 0);
    }

    /// A task from `client` with `priority`.
    pub(crate) fn submit_from(
        &mut self,
        id: u64,
        kind: usize,
        work: Duration,
        client: &'static str,
        priority: i32,
    ) {
        let job = Job {
            id,
            model: self.names[kind].clone(),
            kind,
            at: self.now,
            work,
            client,
            priority,
            key: None,
        };
        let d = self.state.submit(job, self.now);
        self.apply(d);
    }

    fn apply(&mut self, decisions: Vec<Decision<Job>>) {
        for d in decisions {
            if let Decision::Start {
                task,
                host,
                cold: believed_cold,
                ..
            } = d
            {
                let h = host.0;
                if !self.running[h].is_empty() {
                    self.result.slot_violations += 1;
                }
                if self.running[h].iter().any(|r| r.1 != task.kind) {
                    self.result.model_violations += 1;
                }
                let cold = self.resident[h] != Some(task.kind);
                let ttft = if cold { self.load } else { Duration::ZERO };
                if cold {
                    self.result.loads += 1;
                    self.resident[h] = Some(task.kind);
                }
                // The worker reports what the scheduler believed; the first token tells the truth.
                self.started.insert(task.id, self.now);
                self.running[h].push((task.id, task.kind, believed_cold, ttft, ttft + task.work));
                self.seq += 1;
                self.events
                    .push(Reverse((self.now + ttft, self.seq, 0, h, task.id)));
                self.seq += 1;
                self.events.push(Reverse((
                    self.now + ttft + task.work,
                    self.seq,
                    1,
                    h,
                    task.id,
                )));
            }
        }
    }

    /// Runs until nothing runs and nothing is due (a gated client then submits its next
    /// batch).
    pub(crate) fn run(&mut self) {
        self.run_until(None);
    }

    /// Runs the events due up to `until` (all with `None`), then stands at `until`.
    pub(crate) fn run_until(&mut self, until: Option<Instant>) {
        loop {
            let next_event = self.events.peek().map(|Reverse(e)| e.0);
            let next_tick = self.state.next_deadline();
            let Some(at) = [next_event, next_tick].into_iter().flatten().min() else {
                if let Some(u) = until {
                    self.now = self.now.max(u);
                }
                return;
            };
            if until.is_some_and(|u| at > u) {
                self.now = self.now.max(until.unwrap_or(at));
                return;
            }
            self.now = self.now.max(at);
            if next_event.is_some_and(|e| e <= self.now) {
                let Reverse((_, _, kind, h, id)) = self.events.pop().expect("peeked");
                if kind == 0 {
                    let d = self.state.first_byte(HostId(h), TaskId(id), self.now);
                    self.apply(d);
                    continue;
                }
                let at = self.running[h]
                    .iter()
                    .position(|r| r.0 == id)
                    .expect("running");
                let (_, model, cold, ttft, service) = self.running[h].swap_remove(at);
                self.ended.insert(id, self.now);
                self.result.completed += 1;
                let release = Release {
                    outcome: Outcome::Completed,
                    signal: HostSignal::Healthy,
                    retry: None,
                    observed: Some((
                        self.names[model].to_string(),
                        Observed {
                            cold,
                            ttft: Some(ttft),
                            service,
                        },
                    )),
                };
                let d = self.state.released(HostId(h), release, self.now);
                self.apply(d);
                let d = self.state.worker_idle(HostId(h), self.now);
                self.apply(d);
            } else {
                let d = self.state.tick(self.now);
                self.apply(d);
            }
        }
    }
}

/// One battery through one strategy.
fn simulate(
    hosts: usize,
    models: usize,
    jobs: &[(usize, Duration)],
    load: Duration,
    strategy: &str,
) -> SwapResult {
    let t0 = Instant::now();
    let mut sim = Sim::new(hosts, models, load, strategy == "swap-aware", t0);
    if strategy == "gated" {
        for m in 0..models {
            for (i, &(kind, work)) in jobs.iter().enumerate() {
                if kind == m {
                    sim.submit(i as u64 + 1, kind, work);
                }
            }
            sim.run();
        }
    } else {
        for (i, &(kind, work)) in jobs.iter().enumerate() {
            sim.submit(i as u64 + 1, kind, work);
        }
        sim.run();
    }
    assert_eq!(
        sim.result.completed,
        jobs.len(),
        "every task ran ({strategy})"
    );
    sim.result.makespan = sim.now - t0;
    sim.result
}

fn lower_bound(
    hosts: usize,
    models: usize,
    jobs: &[(usize, Duration)],
    load: Duration,
) -> Duration {
    let work: Duration = jobs.iter().map(|j| j.1).sum();
    let longest = jobs.iter().map(|j| j.1).max().unwrap_or_default();
    ((work + load * models.max(hosts) as u32) / hosts as u32).max(longest + load)
}

/// Prints the section; returns false when an invariant broke or a target was missed.
pub fn swap(seeds: u64) -> bool {
    let mean = Duration::from_secs(10);
    // (hosts, models, tests per model): at least 200 tasks each.
    let fleets = [(2, 4, 50), (4, 4, 50), (16, 8, 50)];
    let orders = [Order::TestByTest, Order::ModelByModel, Order::TwoClients];
    let mut ok = true;
    println!(
        "one-slot hosts holding one model at a time, none at the start; tasks log-normal, mean {} s; \
         {seeds} seeds per row (median [min, max]); bound and minimum loads as in the module doc\n",
        mean.as_secs()
    );
    println!(
        "| hosts | models × tests | load / task | order | swap-aware: of bound | loads (min; all hosts) | load-blind: of bound | loads | gated: of bound | loads | swap-aware vs gated |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &(hosts, models, tests) in &fleets {
        for factor in [2u32, 6, 20] {
            let load = mean * factor;
            for order in orders {
                let mut eff = [Vec::new(), Vec::new(), Vec::new()];
                let mut loads = [Vec::new(), Vec::new(), Vec::new()];
                let mut speedup = Vec::new();
                for seed in 0..seeds {
                    let jobs = battery(
                        models,
                        tests,
                        mean,
                        order,
                        0x5eed ^ (seed << 8) ^ hosts as u64,
                    );
                    let bound = lower_bound(hosts, models, &jobs, load).as_secs_f64();
                    let mut makespans = [0.0; 3];
                    for (k, strategy) in ["swap-aware", "load-blind", "gated"].iter().enumerate() {
                        let r = simulate(hosts, models, &jobs, load, strategy);
                        if r.slot_violations + r.model_violations > 0 {
                            println!(
                                "BUG? {strategy}: {} slot and {} model violations",
                                r.slot_violations, r.model_violations
                            );
                            ok = false;
                        }
                        makespans[k] = r.makespan.as_secs_f64();
                        eff[k].push(bound / makespans[k]);
                        loads[k].push(r.loads as f64);
                    }
                    speedup.push(makespans[2] / makespans[0]);
                }
                println!(
                    "| {hosts} | {models} × {tests} | {factor}× | {order:?} | {} | {} ({models}; {}) | {} | {} | {} | {} | {}× |",
                    fmt_spread(&eff[0], 2),
                    fmt_spread(&loads[0], 0),
                    models.max(hosts),
                    fmt_spread(&eff[1], 2),
                    fmt_spread(&loads[1], 0),
                    fmt_spread(&eff[2], 2),
                    fmt_spread(&loads[2], 0),
                    fmt_spread(&speedup, 2),
                );
            }
        }
    }
    ok
}

/// Quick check for `cargo test --benches`: one small battery, invariants and the ordering of
/// the strategies on a fleet where it is clear-cut.
pub fn smoke() {
    let mean = Duration::from_secs(10);
    let jobs = battery(4, 10, mean, Order::TestByTest, 7);
    let load = mean * 5;
    let aware = simulate(2, 4, &jobs, load, "swap-aware");
    let blind = simulate(2, 4, &jobs, load, "load-blind");
    assert_eq!(aware.slot_violations + aware.model_violations, 0);
    assert!(
        aware.loads < blind.loads,
        "{} vs {} loads",
        aware.loads,
        blind.loads
    );
    assert!(aware.makespan < blind.makespan);
}
