//! Benchmarks of prix-dispatch: scheduling efficiency, overhead, scale.
//!
//! ```text
//! cargo bench --bench dispatch                       # every section, a few minutes at most
//! cargo bench --bench dispatch -- efficiency         # or: overhead, scale (several may be given)
//! ```
//!
//! - **efficiency**: a discrete-event simulation in virtual time of the real
//!   [`DispatchState`] (a task holds its slot for its duration; `now` is advanced by hand, nothing
//!   sleeps), on simulated fleets, against the lower bound of
//!   [`prix_dispatch::demo::makespan_lower_bound`] and against a naive early-binding baseline
//!   (every request picks a random host that lists its model when it arrives and waits in that
//!   host's own FIFO). Every `Start` is checked for the slot bound and one model per host.
//! - **overhead**: zero-delay simulated hosts on loopback: the OpenAI API through the daemon,
//!   MCP over HTTP, and MCP over stdio (the built binary, standalone and through the bridge to a
//!   daemon it starts), versus calling a simulated host directly.
//! - **scale**: the cost of one scheduling decision with 10 to 100,000 queued tasks and 2 to
//!   128 hosts, and the resident memory per queued task (measured in a child process).
//!
//! Environment: `DISPATCH_BENCH_SEED=<u64>` replays the efficiency batteries from another base
//! seed; `DISPATCH_BENCH_TRACE=<fleet index>:<tasks>` (e.g. `3:5000`) prints, for each run of that
//! scenario, each model's work and last end and what each host ran; `DISPATCH_BENCH_MAX_LOAD=<f64>` waits (up to 10 minutes) before each section until the
//! 1-minute load average is below that value. Run without `--bench` (as `cargo test --benches`
//! does), the binary only runs a small smoke check.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant as Wall};

use prix_dispatch::Dispatcher;
use prix_dispatch::config::{Config, ConfigSource, HostConfig};
use prix_dispatch::demo::makespan_lower_bound;
use prix_dispatch::http::{HttpOptions, serve};
use prix_dispatch::scheduler::costs::Observed;
use prix_dispatch::scheduler::fair::QueueKey;
use prix_dispatch::scheduler::state::{
    Decision, DispatchState, HostId, HostSignal, Limits, ManifestReport, Outcome, Queueable,
    Release,
};
use prix_dispatch::sim::{Behaviour, SimConfig, SimHost};
use prix_dispatch::task::TaskId;
use tokio::time::Instant;

#[path = "dispatch/fair.rs"]
mod fair;
#[path = "dispatch/swap.rs"]
mod swap;

/// The recorded seed of the efficiency batteries (override with `DISPATCH_BENCH_SEED`).
const BASE_SEED: u64 = 0x0d15_9a7c_4be1_2025;
/// Repeated runs per figure (different seeds for the simulations, fresh runs otherwise).
const REPEATS: usize = 3;
/// Seeds per efficiency scenario.
const EFFICIENCY_SEEDS: u64 = 5;

// ---- a counting allocator, switched on only in the memory child process --------------------

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---- shared helpers ---------------------------------------------------------------------------

/// splitmix64: small, deterministic, good enough for workloads.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A queued task as the benchmark sees it: its payload is what it carries here.
#[derive(Debug)]
struct Job {
    id: u64,
    model: Arc<str>,
    kind: usize,
    at: Instant,
    work: Duration,
    /// Who sent it (fair share); one client unless a section says otherwise.
    client: &'static str,
    priority: i32,
    key: Option<QueueKey>,
}

impl Queueable for Job {
    fn id(&self) -> TaskId {
        TaskId(self.id)
    }
    fn model(&self) -> &str {
        &self.model
    }
    fn enqueued_at(&self) -> Instant {
        self.at
    }
    fn queue_deadline(&self) -> Option<Instant> {
        None
    }
    fn attempts(&self) -> u32 {
        0
    }
    fn abandoned(&self) -> bool {
        false
    }
    fn notify_position(&self, _position: usize, _starts_in: Option<Duration>) {}
    fn client_id(&self) -> &str {
        self.client
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn queue_key(&self) -> Option<QueueKey> {
        self.key
    }
    fn set_queue_key(&mut self, key: QueueKey) {
        self.key = Some(key);
    }
}

fn completed() -> Release<Job> {
    Release {
        outcome: Outcome::Completed,
        signal: HostSignal::Healthy,
        retry: None,
        observed: None,
    }
}

fn model_names(n: usize) -> Vec<Arc<str>> {
    (0..n).map(|k| Arc::from(format!("model-{k}"))).collect()
}

fn report(host: usize, models: &[usize], names: &[Arc<str>]) -> ManifestReport {
    ManifestReport {
        host: HostId(host),
        models: Ok(models.iter().map(|&k| names[k].to_string()).collect()),
        loaded: None,
    }
}

/// (median, min, max).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (
        median,
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

/// "median [min, max]" with `digits` decimals.
fn fmt_spread(values: &[f64], digits: usize) -> String {
    if values.iter().any(|v| v.is_nan()) {
        return "–".to_string();
    }
    let (m, lo, hi) = spread(values);
    format!("{m:.digits$} [{lo:.digits$}, {hi:.digits$}]")
}

/// The `p` quantile (nearest rank) of sorted values.
fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn load_1min() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (up to 10 minutes) for the 1-minute load average to drop below
/// `DISPATCH_BENCH_MAX_LOAD`, when set.
fn wait_for_quiet() {
    let Some(max) = std::env::var("DISPATCH_BENCH_MAX_LOAD")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    else {
        return;
    };
    let deadline = Wall::now() + Duration::from_secs(600);
    while load_1min() >= max && Wall::now() < deadline {
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn section_header(name: &str) {
    wait_for_quiet();
    println!(
        "\n## {name}\n\nload average (1/5/15 min) at start: {}\n",
        loadavg()
    );
}

// ---- 1. scheduling efficiency: discrete-event simulation in virtual time -------------------

struct Fleet {
    name: &'static str,
    /// (slots, models listed) per host.
    hosts: Vec<(usize, Vec<usize>)>,
    models: usize,
}

fn fleets() -> Vec<Fleet> {
    // 16 hosts with mixed slots; model k is listed by `cover[k]` consecutive hosts starting at
    // host 5k (mod 16): one model everywhere, one on a single host.
    let slots16 = [1, 2, 1, 4, 1, 1, 2, 1, 4, 1, 2, 1, 1, 2, 1, 4];
    let cover = [16, 12, 8, 6, 4, 3, 2, 1];
    let sixteen: Vec<(usize, Vec<usize>)> = (0..16)
        .map(|i| {
            let models = (0..8)
                .filter(|&k| (i + 16 - (5 * k) % 16) % 16 < cover[k])
                .collect();
            (slots16[i], models)
        })
        .collect();
    vec![
        Fleet {
            name: "2 hosts (1+2 slots), 2 models",
            hosts: vec![(1, vec![0, 1]), (2, vec![0])],
            models: 2,
        },
        Fleet {
            name: "4 hosts (1+2+1+4 slots), 1 model",
            hosts: vec![(1, vec![0]), (2, vec![0]), (1, vec![0]), (4, vec![0])],
            models: 1,
        },
        Fleet {
            name: "4 hosts (1+2+1+4 slots), 4 models",
            hosts: vec![
                (1, vec![0, 1, 2, 3]),
                (2, vec![0, 1]),
                (1, vec![0, 2]),
                (4, vec![0]),
            ],
            models: 4,
        },
        Fleet {
            name: "16 hosts (29 slots), 8 models",
            hosts: sixteen.clone(),
            models: 8,
        },
        // Control: the same listings with one slot per host, where the drain guard never
        // keeps a host on one model while another waits.
        Fleet {
            name: "control: same 16 hosts, 1 slot each",
            hosts: sixteen.into_iter().map(|(_, m)| (1, m)).collect(),
            models: 8,
        },
    ]
}

/// One task of a battery: its model and how long it holds its slot.
#[derive(Debug, Clone, Copy)]
struct Spec {
    kind: usize,
    work: Duration,
}

/// A battery drawn from `seed`: each model's share of the work is proportional to the slots
/// that serve it times U(0.5, 1.5) (so no single host trivially dominates the bound); a model's
/// mean task length is log-uniform in 3..40 s; each task's length is that mean times a
/// log-normal factor (sigma 0.8, mean 1), clamped to 0.2 s..30 min. Submission order is random.
fn battery(fleet: &Fleet, n: usize, seed: u64) -> Vec<Spec> {
    let mut rng = Rng::new(seed);
    let capacity: Vec<f64> = (0..fleet.models)
        .map(|k| {
            fleet
                .hosts
                .iter()
                .filter(|(_, m)| m.contains(&k))
                .map(|(s, _)| *s as f64)
                .sum()
        })
        .collect();
    let weight: Vec<f64> = capacity.iter().map(|c| c * (0.5 + rng.unit())).collect();
    let mean_s: Vec<f64> = (0..fleet.models)
        .map(|_| (3f64.ln() + rng.unit() * (40f64 / 3.0).ln()).exp())
        .collect();
    // Tasks per model proportional to weight / mean length.
    let pick: Vec<f64> = weight.iter().zip(&mean_s).map(|(w, m)| w / m).collect();
    let total: f64 = pick.iter().sum();
    (0..n)
        .map(|_| {
            let mut x = rng.unit() * total;
            let mut kind = fleet.models - 1;
            for (k, p) in pick.iter().enumerate() {
                if x < *p {
                    kind = k;
                    break;
                }
                x -= p;
            }
            let factor = (0.8 * rng.normal() - 0.32).exp();
            let secs = (mean_s[kind] * factor).clamp(0.2, 1800.0);
            Spec {
                kind,
                work: Duration::from_millis((secs * 1000.0).round() as u64),
            }
        })
        .collect()
}

fn lower_bound(fleet: &Fleet, jobs: &[Spec], names: &[Arc<str>]) -> (Duration, Duration) {
    let hosts: Vec<(usize, Vec<String>)> = fleet
        .hosts
        .iter()
        .map(|(s, m)| (*s, m.iter().map(|&k| names[k].to_string()).collect()))
        .collect();
    let mut work: BTreeMap<String, Duration> = BTreeMap::new();
    let mut longest = Duration::ZERO;
    for j in jobs {
        *work.entry(names[j.kind].to_string()).or_default() += j.work;
        longest = longest.max(j.work);
    }
    (makespan_lower_bound(&hosts, &work, longest), longest)
}

#[derive(Debug, Default, Clone)]
struct SimResult {
    makespan: Duration,
    /// Host-seconds during which a host ran nothing while a task of a model it lists waited.
    gpu_idle_waiting: f64,
    /// Slot-seconds during which a slot was free while a task it could legally take (its host's
    /// current model, or any listed model when the host is empty) waited.
    slot_idle_servable: f64,
    /// Slot-seconds free only because the host streams another model (the drain guard).
    slot_idle_drain: f64,
    /// Slot-seconds free while tasks waited, none of a model the host lists.
    slot_idle_unlisted: f64,
    /// Slot-seconds free once nothing waited any more (the last tasks running out).
    slot_idle_tail: f64,
    slot_violations: u64,
    model_violations: u64,
    unlisted_starts: u64,
    failed: u64,
    completed: usize,
    /// Per model, when its last task ended (seconds); per host, tasks run per model.
    model_done: Vec<f64>,
    host_ran: Vec<Vec<usize>>,
}

/// Runs `jobs` (all submitted at t = 0, in order) through the real `DispatchState`.
fn simulate(fleet: &Fleet, jobs: &[Spec], max_bypass: Duration) -> SimResult {
    let names = model_names(fleet.models);
    let t0 = Instant::now();
    let limits = Limits {
        max_pending: 1_000_000,
        max_bypass,
        ..Limits::default()
    };
    let state = DispatchState::new(
        fleet
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (format!("h{i}"), *s)),
        limits,
    );
    let mut des = Des {
        state,
        now: t0,
        events: BinaryHeap::new(),
        seq: 0,
        running: vec![Vec::new(); fleet.hosts.len()],
        observed: std::collections::HashMap::new(),
        slots: fleet.hosts.iter().map(|(s, _)| *s).collect(),
        lists: fleet
            .hosts
            .iter()
            .map(|(_, m)| (0..fleet.models).map(|k| m.contains(&k)).collect())
            .collect(),
        waiting: vec![0; fleet.models],
        result: SimResult {
            model_done: vec![0.0; fleet.models],
            host_ran: vec![vec![0; fleet.models]; fleet.hosts.len()],
            ..SimResult::default()
        },
    };
    let d = des.state.start();
    des.apply(d);
    let reports = fleet
        .hosts
        .iter()
        .enumerate()
        .map(|(i, (_, m))| report(i, m, &names))
        .collect();
    let d = des.state.manifests_read(reports, t0);
    des.apply(d);
    for (i, (slots, _)) in fleet.hosts.iter().enumerate() {
        for _ in 0..*slots {
            let d = des.state.worker_idle(HostId(i), t0);
            des.apply(d);
        }
    }
    for (id, spec) in jobs.iter().enumerate() {
        des.waiting[spec.kind] += 1;
        let job = Job {
            id: id as u64 + 1,
            model: names[spec.kind].clone(),
            kind: spec.kind,
            at: t0,
            work: spec.work,
            client: "bench",
            priority: 0,
            key: None,
        };
        let d = des.state.submit(job, t0);
        des.apply(d);
    }
    while let Some(&Reverse((at, _, _, _))) = des.events.peek() {
        des.account(at - des.now);
        des.now = at;
        while let Some(&Reverse((t, _, host, id))) = des.events.peek() {
            if t != at {
                break;
            }
            des.events.pop();
            let at_s = (at - t0).as_secs_f64();
            if let Some(i) = des.running[host].iter().position(|(j, _)| *j == id) {
                let (_, kind) = des.running[host].swap_remove(i);
                des.result.model_done[kind] = des.result.model_done[kind].max(at_s);
            }
            des.result.completed += 1;
            let release = match des.observed.remove(&id) {
                Some((cold, work, kind)) => Release {
                    observed: Some((
                        names[kind].to_string(),
                        Observed {
                            cold,
                            ttft: Some(Duration::from_millis(1)),
                            service: work,
                        },
                    )),
                    ..completed()
                },
                None => completed(),
            };
            let d = des.state.released(HostId(host), release, at);
            des.apply(d);
            let d = des.state.worker_idle(HostId(host), at);
            des.apply(d);
        }
    }
    des.result.makespan = des.now - t0;
    des.result
}

struct Des {
    state: DispatchState<Job>,
    now: Instant,
    /// Completions: (when, sequence, host, task id).
    events: BinaryHeap<Reverse<(Instant, u64, usize, u64)>>,
    seq: u64,
    /// Per host: (task id, model) running, from the `Start` decisions.
    running: Vec<Vec<(u64, usize)>>,
    /// Per running task: whether it started cold, and its work (for the cost model: these
    /// hosts pay nothing for a switch, and the scheduler learns so from their first tokens).
    observed: std::collections::HashMap<u64, (bool, Duration, usize)>,
    slots: Vec<usize>,
    lists: Vec<Vec<bool>>,
    /// Per model: tasks submitted and not started.
    waiting: Vec<usize>,
    result: SimResult,
}

impl Des {
    fn apply(&mut self, decisions: Vec<Decision<Job>>) {
        // These hosts answer at once: a cold request's first byte (which opens the cold-load
        // gate of a multi-slot host) comes at the instant it starts.
        let mut first_bytes = Vec::new();
        for d in decisions {
            match d {
                Decision::Start {
                    task, host, cold, ..
                } => {
                    let h = host.0;
                    if cold {
                        first_bytes.push((host, task.id));
                    }
                    self.observed.insert(task.id, (cold, task.work, task.kind));
                    if self.running[h].len() >= self.slots[h] {
                        self.result.slot_violations += 1;
                    }
                    if self.running[h].iter().any(|(_, k)| *k != task.kind) {
                        self.result.model_violations += 1;
                    }
                    if !self.lists[h][task.kind] {
                        self.result.unlisted_starts += 1;
                    }
                    self.waiting[task.kind] -= 1;
                    self.running[h].push((task.id, task.kind));
                    self.result.host_ran[h][task.kind] += 1;
                    self.seq += 1;
                    self.events
                        .push(Reverse((self.now + task.work, self.seq, h, task.id)));
                }
                Decision::Fail { task, .. } => {
                    self.waiting[task.kind] -= 1;
                    self.result.failed += 1;
                }
                Decision::ReadManifests
                | Decision::Probe { .. }
                | Decision::Health { .. }
                | Decision::DismissWorkers { .. }
                | Decision::ReadSlots { .. } => {}
            }
        }
        for (host, id) in first_bytes {
            let d = self.state.first_byte(host, TaskId(id), self.now);
            self.apply(d);
        }
    }

    /// Charges `dt` of the current state to the idle counters.
    fn account(&mut self, dt: Duration) {
        let dt = dt.as_secs_f64();
        if dt == 0.0 {
            return;
        }
        let any_waiting = self.waiting.iter().any(|&w| w > 0);
        for (h, running) in self.running.iter().enumerate() {
            let free = (self.slots[h] - running.len().min(self.slots[h])) as f64;
            let listed_waiting =
                (0..self.waiting.len()).any(|k| self.lists[h][k] && self.waiting[k] > 0);
            match running.first() {
                None if listed_waiting => {
                    self.result.gpu_idle_waiting += dt;
                    self.result.slot_idle_servable += free * dt;
                }
                Some(&(_, current)) if self.waiting[current] > 0 => {
                    self.result.slot_idle_servable += free * dt;
                }
                Some(_) if listed_waiting => self.result.slot_idle_drain += free * dt,
                _ if any_waiting => self.result.slot_idle_unlisted += free * dt,
                _ => self.result.slot_idle_tail += free * dt,
            }
        }
    }
}

/// The naive baseline: each request picks a random host that lists its model when it arrives
/// and waits in that host's own FIFO (served by all its slots, with no one-model rule: the
/// baseline gets that for free). Returns (makespan, host-seconds a host sat empty while a task
/// of a model it lists waited at another host).
fn baseline(fleet: &Fleet, jobs: &[Spec], seed: u64) -> (Duration, f64) {
    let mut rng = Rng::new(seed ^ 0xba5e_11e0);
    let mut queues: Vec<Vec<Spec>> = vec![Vec::new(); fleet.hosts.len()];
    for j in jobs {
        let listers: Vec<usize> = (0..fleet.hosts.len())
            .filter(|&h| fleet.hosts[h].1.contains(&j.kind))
            .collect();
        queues[listers[rng.below(listers.len())]].push(*j);
    }
    let mut finish = vec![Duration::ZERO; fleet.hosts.len()];
    // Per model: the latest start of one of its tasks (all arrived at 0, so it waited until then).
    let mut waits_until = vec![Duration::ZERO; fleet.models];
    for (h, queue) in queues.iter().enumerate() {
        let mut free: BinaryHeap<Reverse<Duration>> = (0..fleet.hosts[h].0)
            .map(|_| Reverse(Duration::ZERO))
            .collect();
        for j in queue {
            let Reverse(start) = free.pop().expect("a slot");
            waits_until[j.kind] = waits_until[j.kind].max(start);
            let end = start + j.work;
            finish[h] = finish[h].max(end);
            free.push(Reverse(end));
        }
    }
    let makespan = finish.iter().copied().max().unwrap_or_default();
    let idle: f64 = fleet
        .hosts
        .iter()
        .enumerate()
        .map(|(h, (_, models))| {
            let until = models
                .iter()
                .map(|&k| waits_until[k])
                .max()
                .unwrap_or_default();
            until.saturating_sub(finish[h]).as_secs_f64()
        })
        .sum();
    (makespan, idle)
}

fn scenario_seed(base: u64, fleet: usize, n: usize, rep: u64) -> u64 {
    let mut r = Rng::new(base ^ ((fleet as u64) << 48) ^ ((n as u64) << 16) ^ rep);
    r.next()
}

struct Row {
    fleet: String,
    tasks: usize,
    eff_default: Vec<f64>,
    eff_off: Vec<f64>,
    eff_naive: Vec<f64>,
    /// The same scheduler (30 s) on the battery sorted longest task first.
    eff_sorted: Vec<f64>,
    gain_default: Vec<f64>,
    gain_off: Vec<f64>,
    gap_default: Vec<f64>,
    gap_off: Vec<f64>,
    idle_default: Vec<f64>,
    idle_off: Vec<f64>,
    idle_naive: Vec<f64>,
    servable_default: Vec<f64>,
    servable_off: Vec<f64>,
    drain_default: Vec<f64>,
    drain_off: Vec<f64>,
    unlisted_default: Vec<f64>,
    tail_default: Vec<f64>,
    violations: u64,
}

fn efficiency(sizes: &[usize], seeds: u64, fleets: &[Fleet]) -> bool {
    let base = std::env::var("DISPATCH_BENCH_SEED")
        .ok()
        .and_then(|s| {
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or_else(|| s.parse().ok())
        })
        .unwrap_or(BASE_SEED);
    println!(
        "virtual time, real DispatchState; all tasks submitted at t = 0; base seed {base:#018x} \
         (DISPATCH_BENCH_SEED); {seeds} seeds per row: median [min, max]\n"
    );
    let trace = std::env::var("DISPATCH_BENCH_TRACE").ok();
    let started = Wall::now();
    let mut rows = Vec::new();
    let mut ok = true;
    for (fi, fleet) in fleets.iter().enumerate() {
        let names = model_names(fleet.models);
        for &n in sizes {
            let mut row = Row {
                fleet: fleet.name.to_string(),
                tasks: n,
                eff_default: vec![],
                eff_off: vec![],
                eff_naive: vec![],
                eff_sorted: vec![],
                gain_default: vec![],
                gain_off: vec![],
                gap_default: vec![],
                gap_off: vec![],
                idle_default: vec![],
                idle_off: vec![],
                idle_naive: vec![],
                servable_default: vec![],
                servable_off: vec![],
                drain_default: vec![],
                drain_off: vec![],
                unlisted_default: vec![],
                tail_default: vec![],
                violations: 0,
            };
            for rep in 0..seeds {
                let seed = scenario_seed(base, fi, n, rep);
                let jobs = battery(fleet, n, seed);
                let (bound, longest) = lower_bound(fleet, &jobs, &names);
                let (naive, naive_idle) = baseline(fleet, &jobs, seed);
                for (bypass, label) in [(Duration::from_secs(30), "30s"), (Duration::MAX, "off")] {
                    let r = simulate(fleet, &jobs, bypass);
                    let bad = r.slot_violations
                        + r.model_violations
                        + r.unlisted_starts
                        + r.failed
                        + (r.completed != n) as u64;
                    let hold_free = bypass == Duration::MAX;
                    // A free slot may wait only on a host held to drain for a scarcer or an
                    // overdue model (`held_for_drain`): that is "slot idle, servable", reported
                    // apart. A host running nothing while a task it could serve waits is a bug.
                    if bad > 0 || r.gpu_idle_waiting > 0.0 {
                        ok = false;
                        println!(
                            "BUG? fleet '{}' tasks {n} seed {seed:#018x} max_bypass {label}: \
                             {r:?}",
                            fleet.name
                        );
                    }
                    row.violations += bad;
                    if trace.as_deref() == Some(&format!("{fi}:{n}")) {
                        let mut work = vec![0.0; fleet.models];
                        for j in &jobs {
                            work[j.kind] += j.work.as_secs_f64();
                        }
                        println!(
                            "trace seed {seed:#018x} max_bypass {label}: makespan {:.0} s, bound \
                             {:.0} s, longest task {:.0} s\n  work per model (s) {work:.0?}\n  \
                             last end per model (s) {:.0?}\n  tasks run per host, by model \
                             {:?}",
                            r.makespan.as_secs_f64(),
                            bound.as_secs_f64(),
                            longest.as_secs_f64(),
                            r.model_done,
                            r.host_ran
                        );
                    }
                    let eff = bound.as_secs_f64() / r.makespan.as_secs_f64();
                    let gain = naive.as_secs_f64() / r.makespan.as_secs_f64();
                    let gap =
                        (r.makespan.as_secs_f64() - bound.as_secs_f64()) / longest.as_secs_f64();
                    let (e, g, gp, i, s, d) = if hold_free {
                        (
                            &mut row.eff_off,
                            &mut row.gain_off,
                            &mut row.gap_off,
                            &mut row.idle_off,
                            &mut row.servable_off,
                            &mut row.drain_off,
                        )
                    } else {
                        (
                            &mut row.eff_default,
                            &mut row.gain_default,
                            &mut row.gap_default,
                            &mut row.idle_default,
                            &mut row.servable_default,
                            &mut row.drain_default,
                        )
                    };
                    e.push(eff);
                    g.push(gain);
                    gp.push(gap);
                    i.push(r.gpu_idle_waiting);
                    s.push(r.slot_idle_servable);
                    d.push(r.slot_idle_drain);
                    if !hold_free {
                        row.unlisted_default.push(r.slot_idle_unlisted);
                        row.tail_default.push(r.slot_idle_tail);
                    }
                }
                // Reference, not a mode of the daemon: the same rules given the battery longest
                // task first, an order only a scheduler that knew every task's length could
                // choose. What it gains over the random order is what task lengths are worth.
                let mut sorted = jobs.clone();
                sorted.sort_by_key(|j| Reverse(j.work));
                let r = simulate(fleet, &sorted, Duration::from_secs(30));
                let bad = r.slot_violations
                    + r.model_violations
                    + r.unlisted_starts
                    + r.failed
                    + (r.completed != n) as u64;
                if bad > 0 || r.gpu_idle_waiting > 0.0 {
                    ok = false;
                    println!(
                        "BUG? fleet '{}' tasks {n} seed {seed:#018x} sorted longest first: {r:?}",
                        fleet.name
                    );
                }
                row.violations += bad;
                row.eff_sorted
                    .push(bound.as_secs_f64() / r.makespan.as_secs_f64());
                row.eff_naive
                    .push(bound.as_secs_f64() / naive.as_secs_f64());
                row.idle_naive.push(naive_idle);
            }
            rows.push(row);
        }
    }
    println!(
        "Efficiency = lower bound / makespan (1.00 = optimal; target >= 0.98). Gain = naive \
         makespan / dispatch makespan. Reference: the same scheduler given the battery sorted \
         longest task first, which needs every task's length in advance (the daemon does not \
         know them): the part of the gap that knowing lengths would close.\n"
    );
    println!(
        "| fleet | tasks | dispatch, max_bypass 30 s | dispatch, aging off | naive random FIFO | \
         reference: 30 s, longest submitted first | gain (30 s) | gain (off) | slot / model \
         violations |"
    );
    println!("|---|---:|---|---|---|---|---|---|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.fleet,
            r.tasks,
            fmt_spread(&r.eff_default, 3),
            fmt_spread(&r.eff_off, 3),
            fmt_spread(&r.eff_naive, 3),
            fmt_spread(&r.eff_sorted, 3),
            fmt_spread(&r.gain_default, 2),
            fmt_spread(&r.gain_off, 2),
            r.violations
        );
    }
    println!(
        "\nIdle time (seconds, summed over hosts/slots, median [min, max]). \"GPU idle while \
         waiting\": a host ran nothing while a task of a model it lists waited (target 0). \
         \"Slot idle, servable\": a free slot while a task it could legally take waited (only \
         the drain hold may cause it). \"Drain guard\": a free slot on a host streaming another \
         model while only other listed models waited (the one-model rule's cost). \"Nothing \
         listed\": a free slot while tasks waited, none of a model its host lists. \"Tail\": \
         free slots once nothing waited (the last tasks running out). Gap = (makespan - bound) \
         / longest task.\n"
    );
    println!(
        "| fleet | tasks | GPU idle while waiting: 30 s / off / naive | slot idle servable: 30 s / \
         off | drain guard: 30 s / off | nothing listed (30 s) | tail (30 s) | gap in longest \
         tasks: 30 s / off |"
    );
    println!("|---|---:|---|---|---|---|---|---|");
    for r in &rows {
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {} | {:.0} / {:.0} / {} | {} / {} | {} / {} | {} | {} | {} / {} |",
            r.fleet,
            r.tasks,
            max(&r.idle_default),
            max(&r.idle_off),
            fmt_spread(&r.idle_naive, 0),
            fmt_spread(&r.servable_default, 0),
            fmt_spread(&r.servable_off, 0),
            fmt_spread(&r.drain_default, 0),
            fmt_spread(&r.drain_off, 0),
            fmt_spread(&r.unlisted_default, 0),
            fmt_spread(&r.tail_default, 0),
            fmt_spread(&r.gap_default, 2),
            fmt_spread(&r.gap_off, 2),
        );
    }
    println!(
        "\n(GPU idle while waiting for dispatch is the maximum over seeds.) Simulated in {:.2} s \
         of wall time.",
        started.elapsed().as_secs_f64()
    );
    ok
}

// ---- 2. overhead: real HTTP on loopback -----------------------------------------------------

const OVERHEAD_HOSTS: usize = 4;
const OVERHEAD_SLOTS: usize = 16;

#[derive(Default)]
struct Sample {
    ttfb: Vec<Duration>,
    total: Vec<Duration>,
    wall: Duration,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    post: &Post,
) -> (Duration, Duration, usize) {
    let t = Wall::now();
    let mut response = client
        .post(url)
        .headers(post.headers.clone())
        .body(post.body.clone())
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 200, "{url}");
    let mut first = None;
    let mut bytes = 0;
    while let Some(chunk) = response.chunk().await.expect("body") {
        if first.is_none() && !chunk.is_empty() {
            first = Some(t.elapsed());
        }
        bytes += chunk.len();
    }
    let total = t.elapsed();
    (first.unwrap_or(total), total, bytes)
}

/// One kind of POST: its body and headers, to any of `urls` (client i uses url i mod n).
#[derive(Clone)]
struct Post {
    urls: Vec<String>,
    body: bytes::Bytes,
    headers: reqwest::header::HeaderMap,
}

impl Post {
    /// A streaming OpenAI chat completion.
    fn openai(urls: Vec<String>) -> Self {
        let body = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": true
        });
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().expect("header"));
        Self {
            urls,
            body: serde_json::to_vec(&body).expect("json").into(),
            headers,
        }
    }

    /// A stateless (2026-07-28) MCP `tools/call` of `complete_stream`: one POST, no session.
    fn mcp_stateless(url: String) -> Self {
        let body = serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {
                "name": "complete_stream",
                "arguments": {"model_id": "m", "messages": [{"role": "user", "content": "Say hello."}]},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"}
                }
            }
        });
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "complete_stream"),
        ] {
            headers.insert(name, value.parse().expect("header"));
        }
        Self {
            urls: vec![url],
            body: serde_json::to_vec(&body).expect("json").into(),
            headers,
        }
    }
}

async fn load(client: &reqwest::Client, post: &Post, concurrency: usize, total: usize) -> Sample {
    let per_client = total / concurrency;
    let started = Wall::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let client = client.clone();
            let url = post.urls[i % post.urls.len()].clone();
            let post = post.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let (ttfb, total, _) = one_request(&client, &url, &post).await;
                    out.push((ttfb, total));
                }
                out
            })
        })
        .collect();
    let mut sample = Sample::default();
    for t in tasks {
        for (ttfb, total) in t.await.expect("client task") {
            sample.ttfb.push(ttfb);
            sample.total.push(total);
        }
    }
    sample.wall = started.elapsed();
    sample.ttfb.sort();
    sample.total.sort();
    sample
}

fn overhead(requests_c1: usize, requests_c64: usize, repeats: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(overhead_async(requests_c1, requests_c64, repeats));
}

/// The daemon's HTTP front on 127.0.0.1:0, bound the way `prix-dispatch serve` binds it.
async fn front(
    dispatcher: &Dispatcher,
    stop: &tokio_util::sync::CancellationToken,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(serve(
        listener,
        dispatcher.clone(),
        HttpOptions {
            auth_token: None,
            max_request_bytes: 1 << 20,
            ..Default::default()
        },
        stop.clone().cancelled_owned(),
    ));
    (base, server)
}

/// How a measured request travels.
enum Via {
    /// A POST: a streaming OpenAI request (to a host directly, or the daemon), or a stateless
    /// MCP tool call with a plain HTTP client.
    Http(Post),
    /// A `complete_stream` tool call over these MCP sessions (client i uses session i mod n).
    Mcp(Vec<rmcp::service::RunningService<rmcp::RoleClient, ()>>),
}

async fn mcp_call(peer: &rmcp::Peer<rmcp::RoleClient>) -> Duration {
    let args = serde_json::json!({
        "model_id": "m",
        "messages": [{"role": "user", "content": "Say hello."}]
    });
    let t = Wall::now();
    let result = peer
        .call_tool(
            rmcp::model::CallToolRequestParams::new("complete_stream")
                .with_arguments(args.as_object().expect("object").clone()),
        )
        .await
        .expect("tool call");
    let total = t.elapsed();
    assert_eq!(result.is_error, Some(false), "{result:?}");
    total
}

/// `concurrency` clients spread over the MCP sessions (client i on session i mod n), each
/// making its calls one after another.
async fn load_mcp(
    sessions: &[rmcp::service::RunningService<rmcp::RoleClient, ()>],
    concurrency: usize,
    total: usize,
) -> Sample {
    let per_client = total / concurrency;
    let started = Wall::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let peer = sessions[i % sessions.len()].peer().clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    out.push(mcp_call(&peer).await);
                }
                out
            })
        })
        .collect();
    let mut sample = Sample::default();
    for t in tasks {
        sample.total.extend(t.await.expect("client task"));
    }
    sample.wall = started.elapsed();
    sample.total.sort();
    sample
}

/// An MCP client over a `prix-dispatch stdio` child process (the built binary).
async fn stdio_client(
    args: &[&str],
    config: &std::path::Path,
) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    use rmcp::ServiceExt;
    use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
    let command =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_prix-dispatch")).configure(|c| {
            c.args(args)
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "warn");
        });
    ().serve(TokioChildProcess::new(command).expect("spawn prix-dispatch stdio"))
        .await
        .expect("MCP handshake")
}

async fn overhead_async(requests_c1: usize, requests_c64: usize, repeats: usize) {
    let behaviour = Behaviour {
        tokens: 1,
        token_interval_ms: 0,
        ..Behaviour::default()
    };
    let mut sims = Vec::new();
    for _ in 0..OVERHEAD_HOSTS {
        sims.push(
            SimHost::start(SimConfig {
                models: vec!["m".to_string()],
                default: behaviour.clone(),
                ..SimConfig::default()
            })
            .await
            .expect("sim starts"),
        );
    }
    let config = Config::with_hosts(
        ConfigSource::Environment,
        sims.iter()
            .enumerate()
            .map(|(i, sim)| HostConfig {
                name: format!("gpu{i}"),
                base_url: sim.url(),
                slots: OVERHEAD_SLOTS,
                api_key: None,
                ..HostConfig::default()
            })
            .collect(),
    );
    let dispatcher = Dispatcher::start(&config);
    let stop = tokio_util::sync::CancellationToken::new();
    let (base, server) = front(&dispatcher, &stop).await;
    let direct: Vec<String> = sims
        .iter()
        .map(|s| format!("{}/v1/chat/completions", s.url()))
        .collect();
    let mut mcp_http = Vec::new();
    for _ in 0..64 {
        use rmcp::ServiceExt;
        let transport =
            rmcp::transport::StreamableHttpClientTransport::from_uri(format!("{base}/mcp"));
        mcp_http.push(().serve(transport).await.expect("MCP over HTTP"));
    }
    let mcp_http_one = vec![mcp_http.pop().expect("a session")];
    // The same fleet for the child processes: in-process queue (`--standalone`), and the
    // default launch, which bridges to a daemon it starts (idle exit 2 s after the section).
    let dir = std::env::temp_dir().join(format!("prix-bench-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config_path = dir.join("fleet.toml");
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nidle_exit_seconds = 2\nsocket = \"{}\"\n",
        dir.join("daemon.sock").display()
    );
    for (i, sim) in sims.iter().enumerate() {
        toml.push_str(&format!(
            "[[host]]\nname = \"gpu{i}\"\nurl = \"{}\"\nslots = {OVERHEAD_SLOTS}\n",
            sim.url()
        ));
    }
    std::fs::write(&config_path, toml).expect("config");
    let stdio = stdio_client(&["stdio", "--standalone"], &config_path).await;
    let bridged = stdio_client(&["stdio"], &config_path).await;
    let paths: Vec<(&str, Via)> = vec![
        (
            "direct to host (OpenAI stream)",
            Via::Http(Post::openai(direct)),
        ),
        (
            "OpenAI API through the daemon",
            Via::Http(Post::openai(vec![format!("{base}/v1/chat/completions")])),
        ),
        (
            "MCP over HTTP, stateless POSTs (reqwest)",
            Via::Http(Post::mcp_stateless(format!("{base}/mcp"))),
        ),
        ("MCP over HTTP, one session", Via::Mcp(mcp_http_one)),
        ("MCP over HTTP, a session per client", Via::Mcp(mcp_http)),
        ("MCP stdio, standalone", Via::Mcp(vec![stdio])),
        ("MCP stdio through the bridge", Via::Mcp(vec![bridged])),
    ];
    let client = reqwest::Client::new();

    // Every path answers; warm up connections and the manifest reads.
    for (_, via) in &paths {
        match via {
            Via::Http(post) => {
                let text = client
                    .post(&post.urls[0])
                    .headers(post.headers.clone())
                    .body(post.body.clone())
                    .send()
                    .await
                    .expect("send")
                    .text()
                    .await
                    .expect("body");
                assert!(
                    text.contains("data: [DONE]") || text.contains(r#""isError":false"#),
                    "a whole answer: {text}"
                );
                load(&client, post, 64, 640).await;
                load(&client, post, 1, 50).await;
            }
            Via::Mcp(sessions) => {
                load_mcp(sessions, 64, 640).await;
                load_mcp(sessions, 1, 50).await;
            }
        }
    }

    println!(
        "{OVERHEAD_HOSTS} simulated hosts (tokens 1, token_interval_ms 0), {OVERHEAD_SLOTS} \
         slots each in the daemon ({} slots: 64 clients never queue for a slot). The bench \
         process holds the hosts, the in-process daemon (its HTTP front: OpenAI API and MCP) and \
         the clients on one {}-thread Tokio runtime; the stdio paths add a `prix-dispatch stdio` \
         child process (standalone: its own queue; bridged: relaying to a `serve` daemon it \
         started), all on the same cores. OpenAI: reqwest, streaming request, whole body read, \
         TTFB = first body chunk. MCP: rmcp client, `complete_stream` without a progress token, \
         timed to the result (no first byte to time); concurrency 64 = 64 concurrent calls on \
         one session (stdio has one), or one session each over HTTP. Direct: concurrency 1 hits one host, concurrency 64 spreads the clients \
         over the {OVERHEAD_HOSTS} hosts. {repeats} runs, paths interleaved within each run; \
         median [min, max] over runs.\n",
        OVERHEAD_HOSTS * OVERHEAD_SLOTS,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut table = Vec::new();
    let mut peak = 0;
    for (concurrency, requests) in [(1usize, requests_c1), (64, requests_c64)] {
        let mut runs: Vec<Vec<[f64; 6]>> = vec![Vec::new(); paths.len()];
        for _ in 0..repeats {
            for (p, (_, via)) in paths.iter().enumerate() {
                for sim in &sims {
                    sim.reset();
                }
                let s = match via {
                    Via::Http(post) => load(&client, post, concurrency, requests).await,
                    Via::Mcp(sessions) => load_mcp(sessions, concurrency, requests).await,
                };
                if p > 0 {
                    let run_peak = sims.iter().map(|s| s.stats().peak_in_flight).max();
                    peak = peak.max(run_peak.unwrap_or(0));
                }
                // An MCP call has no first byte to time: its answer comes whole.
                let ttfb = |q| {
                    if s.ttfb.is_empty() {
                        f64::NAN
                    } else {
                        us(quantile(&s.ttfb, q))
                    }
                };
                runs[p].push([
                    us(quantile(&s.total, 0.5)),
                    us(quantile(&s.total, 0.99)),
                    us(quantile(&s.total, 0.999)),
                    ttfb(0.5),
                    ttfb(0.99),
                    s.total.len() as f64 / s.wall.as_secs_f64(),
                ]);
            }
        }
        table.push((concurrency, requests, runs));
    }
    println!(
        "| concurrency | requests/run | path | latency p50 µs | p99 µs | p99.9 µs | TTFB p50 µs \
         | TTFB p99 µs | requests/s |"
    );
    println!("|---:|---:|---|---|---|---|---|---|---|");
    for (concurrency, requests, runs) in &table {
        let col = |p: usize, i: usize| -> Vec<f64> { runs[p].iter().map(|r| r[i]).collect() };
        for (p, (name, _)) in paths.iter().enumerate() {
            println!(
                "| {concurrency} | {requests} | {name} | {} | {} | {} | {} | {} | {} |",
                fmt_spread(&col(p, 0), 0),
                fmt_spread(&col(p, 1), 0),
                fmt_spread(&col(p, 2), 0),
                fmt_spread(&col(p, 3), 0),
                fmt_spread(&col(p, 4), 0),
                fmt_spread(&col(p, 5), 0),
            );
        }
        for (p, (name, _)) in paths.iter().enumerate().skip(1) {
            let added = |i: usize| -> Vec<f64> {
                runs[p]
                    .iter()
                    .zip(&runs[0])
                    .map(|(d, x)| d[i] - x[i])
                    .collect()
            };
            let ratio: Vec<f64> = runs[p]
                .iter()
                .zip(&runs[0])
                .map(|(d, x)| d[5] / x[5])
                .collect();
            println!(
                "| {concurrency} | {requests} | **added**, {name} | {} | {} | {} | {} | {} | \
                 ×{} |",
                fmt_spread(&added(0), 0),
                fmt_spread(&added(1), 0),
                fmt_spread(&added(2), 0),
                fmt_spread(&added(3), 0),
                fmt_spread(&added(4), 0),
                fmt_spread(&ratio, 2),
            );
        }
    }
    println!(
        "\n\"added\" = daemon quantile - direct quantile of the same run (a difference of \
         distributions, not of paired requests); the requests/s figure of an \"added\" row is \
         the ratio daemon / direct. Peak requests in flight on one simulated host through the \
         daemon: {peak} (slots {OVERHEAD_SLOTS})."
    );
    assert!(
        peak <= OVERHEAD_SLOTS,
        "a simulated host had {peak} requests in flight through the daemon"
    );
    let status = dispatcher.status().await.expect("status");
    println!(
        "Daemon counters after the section: submitted {}, completed {}, failed {}, retried {}.",
        status.counters.submitted,
        status.counters.completed,
        status.counters.failed,
        status.counters.retried
    );
    for (_, via) in paths {
        if let Via::Mcp(sessions) = via {
            for session in sessions {
                let _ = session.cancel().await;
            }
        }
    }
    stop.cancel();
    let _ = server.await;
    dispatcher.shutdown();
    for sim in sims {
        sim.shutdown().await;
    }
}

// ---- 3. scale: cost of one decision, memory per queued task ---------------------------------

const SCALE_MODELS: usize = 8;

/// Hosts of the scale runs: one slot each; every host lists model 0, one model by its index
/// (so every model is served) and, on fleets of 8 or more, one more by its group of 8.
fn scale_fleet(hosts: usize) -> Vec<Vec<usize>> {
    let group = hosts.min(SCALE_MODELS);
    (0..hosts)
        .map(|i| {
            (0..SCALE_MODELS)
                .filter(|&k| {
                    k == 0 || k % group == i % group || (hosts >= 8 && k == (i / 8 + 3) % 8)
                })
                .collect()
        })
        .collect()
}

/// Carries out the decisions of one scale step; returns how many tasks started.
fn starts(decisions: Vec<Decision<Job>>, busy: &mut [bool], waiting: &mut usize) -> usize {
    let mut n = 0;
    for d in decisions {
        match d {
            Decision::Start { host, .. } => {
                busy[host.0] = true;
                *waiting -= 1;
                n += 1;
            }
            Decision::Fail { .. } => panic!("a task failed in the scale run"),
            _ => {}
        }
    }
    n
}

struct ScaleRun {
    /// released + worker_idle that started the next task, per decision.
    next: Vec<Duration>,
    /// submit (enqueue + the matching that follows), per call.
    submit: Vec<Duration>,
}

/// A `DispatchState` over `scale_fleet(hosts)`, one slot each, its manifests read at `t0`.
fn scale_state(hosts: usize, max_bypass: Duration, t0: Instant) -> DispatchState<Job> {
    let names = model_names(SCALE_MODELS);
    let mut state = DispatchState::new(
        (0..hosts).map(|i| (format!("h{i}"), 1)),
        Limits {
            max_pending: 10_000_000,
            max_bypass,
            ..Limits::default()
        },
    );
    let _ = state.start();
    let reports = scale_fleet(hosts)
        .iter()
        .enumerate()
        .map(|(i, m)| report(i, m, &names))
        .collect();
    let _ = state.manifests_read(reports, t0);
    state
}

fn scale_run(hosts: usize, queued: usize, max_bypass: Duration, iterations: usize) -> ScaleRun {
    let names = model_names(SCALE_MODELS);
    let t0 = Instant::now();
    let mut state = scale_state(hosts, max_bypass, t0);
    let mut busy = vec![false; hosts];
    let mut waiting = 0usize;
    for h in 0..hosts {
        let d = state.worker_idle(HostId(h), t0);
        starts(d, &mut busy, &mut waiting);
    }
    let mut rng = Rng::new(0x5ca1e ^ ((hosts as u64) << 32) ^ (queued as u64));
    let mut next_id = 0u64;
    let mut job = |rng: &mut Rng, now: Instant| {
        next_id += 1;
        let kind = rng.below(SCALE_MODELS);
        Job {
            id: next_id,
            model: names[kind].clone(),
            kind,
            at: now,
            work: Duration::ZERO,
            client: "bench",
            priority: 0,
            key: None,
        }
    };
    while waiting < queued {
        waiting += 1;
        let d = state.submit(job(&mut rng, t0), t0);
        starts(d, &mut busy, &mut waiting);
    }
    let mut run = ScaleRun {
        next: Vec::with_capacity(iterations),
        submit: Vec::with_capacity(iterations),
    };
    let mut now = t0;
    for _ in 0..iterations {
        now += Duration::from_millis(1);
        let h = loop {
            let h = rng.below(hosts);
            if busy[h] {
                break h;
            }
        };
        let t = Wall::now();
        let d1 = state.released(HostId(h), completed(), now);
        let d2 = state.worker_idle(HostId(h), now);
        let took = t.elapsed();
        busy[h] = false;
        let n = starts(d1, &mut busy, &mut waiting) + starts(d2, &mut busy, &mut waiting);
        if n > 0 {
            run.next.push(took);
        }
        while waiting < queued {
            waiting += 1;
            let j = job(&mut rng, now);
            let t = Wall::now();
            let d = state.submit(j, now);
            let took = t.elapsed();
            starts(d, &mut busy, &mut waiting);
            run.submit.push(took);
        }
    }
    run.next.sort();
    run.submit.sort();
    run
}

fn scale(queue_sizes: &[usize], host_counts: &[usize], iterations: usize, repeats: usize) {
    println!(
        "One-slot hosts, {SCALE_MODELS} models (every host lists model-0 and one or two others), \
         tasks of random models; steady state: a random busy host finishes \
         (released + worker_idle, which starts the next task), then submits refill the queue to \
         its size. Time advances 1 ms per completion. \"fresh\": max_bypass 30 s, no task \
         overdue; \"overdue\": max_bypass 0, every task overdue (the aging path). {iterations} \
         completions per run; per-run median and p99, then median [min, max] over {repeats} \
         runs. Times in µs.\n"
    );
    println!(
        "| hosts | queued | regime | next task after a completion: p50 | p99 | submit: p50 | p99 |"
    );
    println!("|---:|---:|---|---|---|---|---|");
    let mut summary: BTreeMap<(usize, &str), Vec<(usize, f64)>> = BTreeMap::new();
    for &hosts in host_counts {
        for &queued in queue_sizes {
            for (regime, bypass) in [
                ("fresh", Duration::from_secs(30)),
                ("overdue", Duration::ZERO),
            ] {
                let mut cols: [Vec<f64>; 4] = Default::default();
                for _ in 0..repeats {
                    let r = scale_run(hosts, queued, bypass, iterations);
                    let us = |d: Duration| d.as_secs_f64() * 1e6;
                    cols[0].push(us(quantile(&r.next, 0.5)));
                    cols[1].push(us(quantile(&r.next, 0.99)));
                    cols[2].push(us(quantile(&r.submit, 0.5)));
                    cols[3].push(us(quantile(&r.submit, 0.99)));
                }
                summary
                    .entry((hosts, regime))
                    .or_default()
                    .push((queued, spread(&cols[0]).0));
                println!(
                    "| {hosts} | {queued} | {regime} | {} | {} | {} | {} |",
                    fmt_spread(&cols[0], 2),
                    fmt_spread(&cols[1], 2),
                    fmt_spread(&cols[2], 2),
                    fmt_spread(&cols[3], 2),
                );
            }
        }
    }
    println!(
        "\nGrowth of the median next-task decision with the queue (largest / smallest queue):\n"
    );
    for ((hosts, regime), v) in &summary {
        if let (Some(first), Some(last)) = (v.first(), v.last()) {
            println!(
                "- {hosts} hosts, {regime}: {:.2} µs at {} queued -> {:.2} µs at {} queued: ×{:.2} \
                 for ×{} the queue",
                first.1,
                first.0,
                last.1,
                last.0,
                last.1 / first.1,
                last.0 / first.0.max(1)
            );
        }
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The child process: a `DispatchState` of 16 hosts, idle, then with `queued` tasks waiting
/// (no worker is idle, so they all queue). Prints "rss_idle_kib rss_full_kib heap_idle heap_full".
fn memory_child(queued: usize) {
    let names = model_names(SCALE_MODELS);
    let t0 = Instant::now();
    let mut state = scale_state(16, Duration::from_secs(30), t0);
    let rss_idle = vm_rss_kib();
    let heap_idle = LIVE_BYTES.load(Ordering::Relaxed);
    let mut rng = Rng::new(7);
    for id in 1..=queued as u64 {
        let kind = rng.below(SCALE_MODELS);
        let d = state.submit(
            Job {
                id,
                model: names[kind].clone(),
                kind,
                at: t0,
                work: Duration::ZERO,
                client: "bench",
                priority: 0,
                key: None,
            },
            t0,
        );
        assert!(d.is_empty(), "no worker is idle: every task queues");
    }
    let rss_full = vm_rss_kib();
    let heap_full = LIVE_BYTES.load(Ordering::Relaxed);
    assert_eq!(state.snapshot().queue.values().sum::<usize>(), queued);
    println!("{rss_idle} {rss_full} {heap_idle} {heap_full}");
    drop(state);
}

fn memory(queued: usize, repeats: usize) {
    let exe = std::env::current_exe().expect("current exe");
    let payload = std::mem::size_of::<Job>();
    let mut idle = Vec::new();
    let mut full = Vec::new();
    let mut rss_per = Vec::new();
    let mut heap_per = Vec::new();
    for _ in 0..repeats {
        let out = std::process::Command::new(&exe)
            .arg("__memory-child")
            .arg(queued.to_string())
            .output()
            .expect("child runs");
        assert!(out.status.success(), "memory child failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        let (rss_idle, rss_full, heap_idle, heap_full) = (v[0], v[1], v[2], v[3]);
        idle.push(rss_idle / 1024.0);
        full.push(rss_full / 1024.0);
        rss_per.push((rss_full - rss_idle) * 1024.0 / queued as f64 - payload as f64);
        heap_per.push((heap_full - heap_idle) / queued as f64 - payload as f64);
    }
    println!(
        "\nResident memory of a process holding one DispatchState (16 hosts, {SCALE_MODELS} \
         models), idle and with {queued} queued tasks; a fresh child process per run, {repeats} \
         runs. Payload = the task value itself, size_of::<Job>() = {payload} bytes (its model \
         name is a shared Arc<str>).\n"
    );
    println!("| measure | median [min, max] |");
    println!("|---|---|");
    println!("| VmRSS idle (MiB) | {} |", fmt_spread(&idle, 2));
    println!(
        "| VmRSS with {queued} queued (MiB) | {} |",
        fmt_spread(&full, 2)
    );
    println!(
        "| VmRSS growth per queued task beyond its payload (bytes) | {} |",
        fmt_spread(&rss_per, 0)
    );
    println!(
        "| live heap per queued task beyond its payload (bytes, counting allocator) | {} |",
        fmt_spread(&heap_per, 0)
    );
}

// ---- main ------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__memory-child") {
        COUNTING.store(true, Ordering::Relaxed);
        let queued = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        memory_child(queued);
        return;
    }
    let names: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .cloned()
        .chain(
            std::env::var("DISPATCH_BENCH")
                .ok()
                .into_iter()
                .flat_map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>()),
        )
        .collect();
    let known = ["efficiency", "swap", "fair", "overhead", "scale"];
    for n in &names {
        assert!(
            known.contains(&n.as_str()),
            "unknown section '{n}': pick from {known:?}"
        );
    }
    let want = |s: &str| names.is_empty() || names.iter().any(|n| n == s);

    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs this binary without `--bench`: a quick smoke check only.
        let fleet = &fleets()[2..3];
        let ok = efficiency(&[200], 1, fleet);
        assert!(ok, "the scheduler broke an invariant in the smoke run");
        let r = scale_run(16, 100, Duration::from_secs(30), 100);
        assert!(!r.next.is_empty() && !r.submit.is_empty());
        swap::smoke();
        println!("smoke check passed; run `cargo bench --bench dispatch` for the figures");
        return;
    }

    let started = Wall::now();
    println!("# prix-dispatch benchmarks");
    let mut ok = true;
    if want("efficiency") {
        section_header("Scheduling efficiency");
        ok &= efficiency(&[200, 1000, 5000], EFFICIENCY_SEEDS, &fleets());
        println!("\nload average at end: {}", loadavg());
    }
    if want("swap") {
        section_header("Hosts that pay for switching models");
        ok &= swap::swap(3);
        println!("\nload average at end: {}", loadavg());
    }
    if want("fair") {
        section_header("Many clients on one fleet");
        ok &= fair::fair(5);
    }
    if want("overhead") {
        section_header("Overhead");
        overhead(1000, 3200, REPEATS);
        println!("\nload average at end: {}", loadavg());
    }
    if want("scale") {
        section_header("Scale");
        scale(&[10, 1000, 100_000], &[2, 16, 128], 10_000, REPEATS);
        memory(100_000, REPEATS);
        println!("\nload average at end: {}", loadavg());
    }
    println!("\ntotal wall time {:.1} s", started.elapsed().as_secs_f64());
    if !ok {
        println!("\nINVARIANT OR IDLE-WHILE-WAITING PROBLEMS FOUND: see the BUG? lines above");
        std::process::exit(1);
    }
}
