//! Soak: 10,000 small tasks through two simulated hosts with injected faults and client
//! cancellations, then every promise the dispatcher makes, checked from the client's side, from
//! the dispatcher's own counters and from what the hosts recorded.
//!
//! Ignored by default (it takes seconds in release, much longer in debug). Run it with
//!
//! ```text
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_SEED=<u64>` replays another workload; the seed in use is printed first, so a failure
//! can be replayed exactly (the workload is a pure function of the seed; timing is not).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Fleet, assert_host_invariants, host, spec};
use prix_dispatch::dispatcher::finish;
use prix_dispatch::sim::{Outcome, RequestRecord, sim_directive};
use prix_dispatch::task::TaskEvent;
use prix_dispatch::{CompletionResult, DispatchError, DispatchStatus, Dispatcher, ErrorKind};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const TASKS: usize = 10_000;
/// Most tasks the client has submitted and not yet seen the end of.
const CLIENT_CONCURRENCY: usize = 400;
const SLOTS: usize = 2;
const MODELS: [&str; 2] = ["model-a", "model-b"];
const DEFAULT_SEED: u64 = 0x50a4_d15b_a7c4_0003;

/// xorshift64: small, deterministic, good enough to shuffle a workload.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A fault the simulated host injects into one request through a `#sim` directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    /// The connection is cut after `cut` content tokens.
    Drop,
    /// HTTP 500 at once.
    Fail500,
    /// The body ends cleanly after `cut` content tokens, without finish reason or `[DONE]`.
    Truncate,
    /// Junk (bad JSON, `choices: null`, comments, `event:` lines) between the real chunks: a
    /// tolerant client still completes.
    Malformed,
}

/// When the client gives up on a task by dropping its handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    Never,
    /// This many ms after submitting (0: at once, before the scheduler may have seen it).
    AfterSubmit(u64),
    /// This many ms after the `Started` event: mid-stream, or just after the end.
    AfterStart(u64),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    index: usize,
    model: &'static str,
    tokens: usize,
    interval_ms: u64,
    fault: Fault,
    /// Content tokens before a `Drop` or `Truncate` (always fewer than `tokens`).
    cut: usize,
    cancel: Cancel,
}

impl Plan {
    fn generate(rng: &mut Rng, index: usize) -> Plan {
        let model = MODELS[rng.below(2) as usize];
        let tokens = 1 + rng.below(4) as usize;
        let interval_ms = rng.below(3);
        // 5% faulted: 1.5% drop, 1% HTTP 500 (3 in a row on one host trip its circuit breaker
        // for 10 s), 1.5% truncate, 1% malformed.
        let fault = match rng.below(1000) {
            0..15 => Fault::Drop,
            15..25 => Fault::Fail500,
            25..40 => Fault::Truncate,
            40..50 => Fault::Malformed,
            _ => Fault::None,
        };
        let cut = rng.below(tokens as u64) as usize;
        // 10% cancelled: half counted from submission (mostly while queued), half from the
        // start on a host (mostly while streaming).
        let cancel = match rng.below(100) {
            0..5 => Cancel::AfterSubmit(rng.below(41)),
            5..10 => Cancel::AfterStart(rng.below(4)),
            _ => Cancel::Never,
        };
        Plan {
            index,
            model,
            tokens,
            interval_ms,
            fault,
            cut,
            cancel,
        }
    }

    fn content(&self) -> String {
        let mut directive = json!({"tokens": self.tokens, "token_interval_ms": self.interval_ms});
        let extra = match self.fault {
            Fault::None => Value::Null,
            Fault::Drop => json!({"drop_after_tokens": self.cut}),
            Fault::Fail500 => json!({"fail_status": 500}),
            Fault::Truncate => json!({"end_after_tokens": self.cut}),
            Fault::Malformed => json!({"malformed": true}),
        };
        if let (Some(d), Some(e)) = (directive.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        format!("{}\nsoak task {}", sim_directive(directive), self.index)
    }

    /// The error this task must end with when it runs to its end; `None`: it must complete.
    fn expected_error(&self) -> Option<ErrorKind> {
        match self.fault {
            Fault::None | Fault::Malformed => None,
            // Aborted when no content arrived before the cut, truncated when some did.
            Fault::Drop | Fault::Truncate if self.cut == 0 => Some(ErrorKind::StreamAborted),
            Fault::Drop | Fault::Truncate => Some(ErrorKind::StreamTruncated),
            Fault::Fail500 => Some(ErrorKind::HostError),
        }
    }

    /// The text a complete answer carries.
    fn expected_text(&self) -> String {
        (0..self.tokens).map(|i| format!("tok{i} ")).collect()
    }
}

#[derive(Debug)]
enum End {
    Completed(CompletionResult),
    Failed(DispatchError),
    /// The client dropped the handle before the end; `running` if it had seen `Started`.
    Cancelled {
        running: bool,
    },
}

struct TaskOutcome {
    plan: Plan,
    end: End,
    /// Submit to the end (or to the cancellation).
    elapsed: Duration,
}

fn end_of(result: Result<CompletionResult, DispatchError>) -> End {
    match result {
        Ok(r) => End::Completed(r),
        Err(e) => End::Failed(e),
    }
}

async fn run_task(dispatcher: Dispatcher, plan: Plan) -> TaskOutcome {
    let t0 = Instant::now();
    let end = match dispatcher.submit(spec(plan.model, &plan.content(), json!({}))) {
        Err(e) => End::Failed(e),
        Ok(mut handle) => match plan.cancel {
            Cancel::Never => end_of(finish(&mut handle, |_| {}).await),
            Cancel::AfterSubmit(0) => {
                drop(handle);
                End::Cancelled { running: false }
            }
            Cancel::AfterSubmit(ms) => {
                let running = AtomicBool::new(false);
                let note = |e: &TaskEvent| {
                    if matches!(e, TaskEvent::Started { .. }) {
                        running.store(true, Ordering::Relaxed);
                    }
                };
                let result =
                    tokio::time::timeout(Duration::from_millis(ms), finish(&mut handle, note))
                        .await;
                match result {
                    Ok(r) => end_of(r),
                    Err(_) => {
                        drop(handle);
                        End::Cancelled {
                            running: running.load(Ordering::Relaxed),
                        }
                    }
                }
            }
            Cancel::AfterStart(ms) => {
                let before_start = loop {
                    match handle.next().await {
                        Some(TaskEvent::Started { .. }) => break None,
                        Some(TaskEvent::Finished(r)) => break Some(Ok(r)),
                        Some(TaskEvent::Failed(e)) => break Some(Err(e)),
                        None => break Some(Err(DispatchError::scheduler_stopped())),
                        Some(_) => {}
                    }
                };
                match before_start {
                    Some(r) => end_of(r),
                    None => {
                        let result = tokio::time::timeout(
                            Duration::from_millis(ms),
                            finish(&mut handle, |_| {}),
                        )
                        .await;
                        match result {
                            Ok(r) => end_of(r),
                            Err(_) => {
                                drop(handle);
                                End::Cancelled { running: true }
                            }
                        }
                    }
                }
            }
        },
    };
    TaskOutcome {
        plan,
        end,
        elapsed: t0.elapsed(),
    }
}

/// A memory figure of this process from /proc/self/status, in KiB: `VmRSS` (resident now) or
/// `VmHWM` (peak resident).
fn proc_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time this process has used (user + system), in seconds; /proc/self/stat counts clock
/// ticks, 100 a second on Linux.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is the first, utime the 12th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn rss_kib() -> u64 {
    proc_kib("VmRSS")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Polls until the queue is empty, every slot is back and every task is accounted for; returns
/// the last status either way (the assertions below say what is wrong).
async fn settled_status(fleet: &Fleet, limit: Duration) -> DispatchStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = fleet.status().await;
        let c = s.counters;
        let settled = s.queued_total == 0
            && s.awaiting_manifest == 0
            && s.hosts.iter().all(|h| h.state.active == 0)
            && c.completed + c.failed + c.cancelled == c.submitted;
        if settled || tokio::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records that break a host invariant (more than `slots` in flight, or two models at once).
fn invariant_breaches(records: &[RequestRecord], slots: usize) -> Vec<&RequestRecord> {
    records
        .iter()
        .filter(|r| {
            r.in_flight_at_start > slots
                || r.other_models_in_flight_at_start
                    .iter()
                    .any(|m| Some(m) != r.model.as_ref())
        })
        .collect()
}

/// The requests that arrived at the host before `r` and had not finished when `r` arrived.
/// (The host counts a request in flight once its body is read, so a request that arrived just
/// after `r` but was read first can also be in `r`'s `in_flight_at_start`.)
fn overlapping<'a>(records: &'a [RequestRecord], r: &RequestRecord) -> Vec<&'a RequestRecord> {
    records
        .iter()
        .filter(|o| o.seq < r.seq && o.end_us.is_none_or(|end| end > r.start_us))
        .collect()
}

/// The soak task a host request was for, from the prompt `Plan::content` wrote.
fn task_of(r: &RequestRecord) -> Option<usize> {
    let content = r.body["messages"][0]["content"].as_str()?;
    content.rsplit_once("soak task ")?.1.parse().ok()
}

/// Whether `r`'s breach is down to client cancellations: `r` itself was cancelled (its request
/// reached the host after its slot had been given back), or the breach goes away when the
/// requests whose client had cancelled are left out.
fn only_cancelled_tails(records: &[RequestRecord], r: &RequestRecord, slots: usize) -> bool {
    if r.outcome == Outcome::ClientDisconnected {
        return true;
    }
    let others = overlapping(records, r);
    let live: Vec<&&RequestRecord> = others
        .iter()
        .filter(|o| o.outcome != Outcome::ClientDisconnected)
        .collect();
    live.len() < others.len() && live.len() < slots && live.iter().all(|o| o.model == r.model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: run with --release -- --ignored --nocapture"]
async fn soak_10000_tasks_with_faults_and_cancellations() {
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    println!("soak: seed {seed} (replay with SOAK_SEED={seed})");
    let rss_start = rss_kib();

    let mut rng = Rng::new(seed);
    let plans: Vec<Plan> = (0..TASKS).map(|i| Plan::generate(&mut rng, i)).collect();
    // auto_evict: like LM Studio's JIT loader, a request for the other model would kill the
    // streams in flight, so two models on one host cannot go unnoticed.
    let fleet = Fleet::start(vec![
        host(&MODELS).slots(SLOTS).sim(|c| c.auto_evict = true),
        host(&MODELS).slots(SLOTS).sim(|c| c.auto_evict = true),
    ])
    .await;
    // The first manifest read, so that start-up is not part of the measured run.
    fleet.dispatcher.refresh_manifests().await.unwrap();
    let rss_before = rss_kib();

    let limit = Arc::new(Semaphore::new(CLIENT_CONCURRENCY));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak_in_flight = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut joins = Vec::with_capacity(TASKS);
    for plan in &plans {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        peak_in_flight.fetch_max(now, Ordering::SeqCst);
        let (dispatcher, in_flight, plan) = (fleet.dispatcher.clone(), in_flight.clone(), *plan);
        joins.push(tokio::spawn(async move {
            let outcome = run_task(dispatcher, plan).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(TASKS);
    for join in joins {
        outcomes.push(join.await.expect("client task panicked"));
    }
    let wall = t0.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let rss_end = rss_kib();

    // ---- client side ----------------------------------------------------------------------
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut cancelled_queued = 0usize;
    let mut cancelled_running = 0usize;
    let mut by_fault: BTreeMap<(Fault, String), usize> = BTreeMap::new();
    let mut retried_ok = 0usize;
    let mut unexpected: Vec<String> = Vec::new();
    let mut latencies: Vec<Duration> = Vec::new();
    for o in &outcomes {
        let p = &o.plan;
        let label = match &o.end {
            End::Completed(r) => {
                ok += 1;
                latencies.push(o.elapsed);
                if r.attempts > 1 {
                    retried_ok += 1;
                }
                if let Some(kind) = p.expected_error() {
                    unexpected.push(format!(
                        "task {} ({:?}, cut {}) completed instead of failing with {kind:?}: {r:?}",
                        p.index, p.fault, p.cut
                    ));
                } else if r.text != p.expected_text() || r.model != p.model {
                    unexpected.push(format!(
                        "task {} answered {:?} by {} for {}, expected {:?} for {}",
                        p.index,
                        r.text,
                        r.host,
                        r.model,
                        p.expected_text(),
                        p.model
                    ));
                }
                "completed".to_string()
            }
            End::Failed(e) => {
                failed += 1;
                if p.expected_error() != Some(e.kind) {
                    unexpected.push(format!(
                        "task {} ({:?}, cut {}, {:?}) failed with {:?} (expected {:?}): {}",
                        p.index,
                        p.fault,
                        p.cut,
                        p.cancel,
                        e.kind,
                        p.expected_error(),
                        e.message
                    ));
                }
                format!("{:?}", e.kind)
            }
            End::Cancelled { running: true } => {
                cancelled_running += 1;
                "cancelled while running".to_string()
            }
            End::Cancelled { running: false } => {
                cancelled_queued += 1;
                "cancelled while queued".to_string()
            }
        };
        *by_fault.entry((p.fault, label)).or_default() += 1;
    }
    let cancelled = cancelled_queued + cancelled_running;
    latencies.sort();

    // ---- dispatcher and hosts -------------------------------------------------------------
    let status = settled_status(&fleet, Duration::from_secs(10)).await;
    let c = status.counters;
    let mut idle = Vec::new();
    let mut records = Vec::new();
    for sim in &fleet.sims {
        idle.push(sim.wait_idle(Duration::from_secs(5)).await);
        records.push(sim.chat_records());
    }
    let planned_faults = plans.iter().filter(|p| p.fault != Fault::None).count();
    let planned_cancels = plans.iter().filter(|p| p.cancel != Cancel::Never).count();
    let dropped_at_once = plans
        .iter()
        .filter(|p| p.cancel == Cancel::AfterSubmit(0))
        .count();

    println!("soak: {TASKS} tasks, at most {CLIENT_CONCURRENCY} in flight from the client");
    println!(
        "  planned: {planned_faults} faulted, {planned_cancels} to be cancelled \
         ({dropped_at_once} of them right after submit); peak client in flight {}",
        peak_in_flight.load(Ordering::SeqCst)
    );
    println!(
        "  wall {:.3} s, {:.0} tasks/s",
        wall.as_secs_f64(),
        TASKS as f64 / wall.as_secs_f64()
    );
    // Every slot had work waiting all along (400 in flight, 4 slots), so the hosts' busy time
    // against 4 slots x wall says how much of the run went to hand-offs between requests.
    let busy_us: u64 = records
        .iter()
        .flatten()
        .filter_map(|r| Some(r.end_us? - r.start_us))
        .sum();
    println!(
        "  CPU {cpu:.1} s (user + system) over the run, {:.0}% of 2 cores; hosts busy {:.1} s \
         = {:.0}% of {} slots x wall",
        100.0 * cpu / (2.0 * wall.as_secs_f64()),
        busy_us as f64 / 1e6,
        100.0 * busy_us as f64 / 1e6 / (records.len() * SLOTS) as f64 / wall.as_secs_f64(),
        records.len() * SLOTS
    );
    println!(
        "  completed-task latency (submit to end, queue wait included): p50 {:?} p99 {:?} \
         max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "  client: ok {ok}, failed {failed}, cancelled {cancelled} \
         ({cancelled_queued} while queued, {cancelled_running} while running); \
         {retried_ok} completed after a retry"
    );
    for ((fault, label), n) in &by_fault {
        println!("    {fault:?} -> {label}: {n}");
    }
    println!("  dispatcher counters: {c:?}");
    let mut breach_count = Vec::new();
    for (i, h) in status.hosts.iter().enumerate() {
        let mut tally: BTreeMap<String, usize> = BTreeMap::new();
        for r in &records[i] {
            *tally.entry(format!("{:?}", r.outcome)).or_default() += 1;
        }
        let stats = fleet.sims[i].stats();
        println!(
            "  {}: health {:?}, active {}, tasks started {}; the host saw {} chat requests \
             (peak {} in flight, {} model overlaps, {} manifest calls, idle {}): {tally:?}",
            h.state.name,
            h.state.health,
            h.state.active,
            h.state.tasks_started,
            records[i].len(),
            stats.peak_in_flight,
            stats.model_overlaps,
            stats.manifest_calls,
            idle[i]
        );
        let breaches = invariant_breaches(&records[i], SLOTS);
        breach_count.push(breaches.len());
        if breaches.is_empty() {
            continue;
        }
        let tails = breaches
            .iter()
            .filter(|r| only_cancelled_tails(&records[i], r, SLOTS))
            .count();
        let mut late: Vec<u64> = breaches
            .iter()
            .flat_map(|r| overlapping(&records[i], r).into_iter().map(move |o| (o, r)))
            .filter(|(o, _)| o.outcome == Outcome::ClientDisconnected)
            .filter_map(|(o, r)| o.end_us.map(|e| e.saturating_sub(r.start_us)))
            .collect();
        late.sort_unstable();
        println!(
            "  {}: {} requests arrived to more than {SLOTS} in flight or another model; {tails} \
             of them only because of a request whose client had cancelled (the host still held \
             it, or it arrived after its slot was given back; such requests ended p50 {} us, \
             max {} us after the arrival). Examples:",
            h.state.name,
            breaches.len(),
            late.get(late.len() / 2).copied().unwrap_or(0),
            late.last().copied().unwrap_or(0)
        );
        // The unexplained ones first, then a couple of the others.
        let (tail, other): (Vec<&RequestRecord>, Vec<&RequestRecord>) = breaches
            .iter()
            .partition(|r| only_cancelled_tails(&records[i], r, SLOTS));
        for r in other.iter().take(5).chain(tail.iter().take(2)) {
            println!(
                "    seq {} {:?} arrived to {} in flight, other models {:?}, ended {:?}: {:?}",
                r.seq,
                r.model,
                r.in_flight_at_start,
                r.other_models_in_flight_at_start,
                r.outcome,
                r.body["messages"][0]["content"]
            );
            for o in overlapping(&records[i], r) {
                println!(
                    "      with seq {} {:?}, {:?} after {} tokens, {} us after this arrival: {:?}",
                    o.seq,
                    o.model,
                    o.outcome,
                    o.tokens_sent,
                    o.end_us.map_or(-1, |e| e as i64 - r.start_us as i64),
                    o.body["messages"][0]["content"]
                );
            }
        }
    }
    println!(
        "  RSS: start {}, before the run {}, at the end {}",
        mib(rss_start),
        mib(rss_before),
        mib(rss_end)
    );

    // ---- the invariants, all checked before any fails ---------------------------------------
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        outcomes.len() == TASKS && ok + failed + cancelled == TASKS,
        format!(
            "client accounted for {} tasks of {TASKS}",
            ok + failed + cancelled
        ),
    );
    check(
        unexpected.is_empty(),
        format!(
            "{} tasks ended other than their fault implies; first ones:\n    {}",
            unexpected.len(),
            unexpected[..unexpected.len().min(10)].join("\n    ")
        ),
    );
    check(
        c.submitted == TASKS as u64,
        format!(
            "the dispatcher counted {} submissions of {TASKS} ({dropped_at_once} tasks were \
             dropped right after submit): {c:?}",
            c.submitted
        ),
    );
    check(
        c.completed + c.failed + c.cancelled == c.submitted,
        format!("completed + failed + cancelled != submitted: {c:?}"),
    );
    // A task can end at the dispatcher just before its client gives up on it, never after.
    check(
        c.completed >= ok as u64 && c.failed >= failed as u64 && c.cancelled <= cancelled as u64,
        format!("counters {c:?} vs client ok {ok}, failed {failed}, cancelled {cancelled}"),
    );
    check(
        status.queued_total == 0 && status.awaiting_manifest == 0,
        format!(
            "tasks still waiting: {} queued, {} awaiting a manifest",
            status.queued_total, status.awaiting_manifest
        ),
    );
    let total_records: usize = records.iter().map(Vec::len).sum();
    check(
        total_records >= ok + failed && total_records as u64 <= c.started,
        format!(
            "hosts saw {total_records} chat requests: expected at least one per task that ran \
             to its end ({}) and at most one per start ({})",
            ok + failed,
            c.started
        ),
    );
    // The dispatcher drops a host connection only for a task its client gave up on.
    let cancelled_by_client: HashSet<usize> = outcomes
        .iter()
        .filter(|o| matches!(o.end, End::Cancelled { .. }))
        .map(|o| o.plan.index)
        .collect();
    let stray_disconnects: Vec<String> = records
        .iter()
        .flatten()
        .filter(|r| r.outcome == Outcome::ClientDisconnected)
        .filter(|r| task_of(r).is_none_or(|t| !cancelled_by_client.contains(&t)))
        .map(|r| format!("{:?} ({} tokens sent)", task_of(r), r.tokens_sent))
        .collect();
    check(
        stray_disconnects.is_empty(),
        format!(
            "{} host requests were disconnected although their client did not cancel: {:?}",
            stray_disconnects.len(),
            &stray_disconnects[..stray_disconnects.len().min(10)]
        ),
    );
    for (i, host_records) in records.iter().enumerate() {
        let unfinished = host_records.iter().filter(|r| !r.is_finished()).count();
        check(
            idle[i] && unfinished == 0,
            format!(
                "gpu{i}: idle {}, {unfinished} requests never ended",
                idle[i]
            ),
        );
        let evicted = host_records
            .iter()
            .filter(|r| r.outcome == Outcome::Evicted)
            .count();
        check(
            evicted == 0,
            format!("gpu{i}: {evicted} streams evicted by a request for the other model"),
        );
        // The shared helper, kept from panicking here so that every check is reported and
        // memory is measured below. The default hook is swapped out meanwhile: it would print
        // a backtrace, whose symbolisation alone adds tens of MiB to the RSS measured below.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let held = std::panic::catch_unwind(AssertUnwindSafe(|| {
            assert_host_invariants(host_records, SLOTS)
        }));
        std::panic::set_hook(hook);
        let first = match &held {
            Ok(()) => String::new(),
            Err(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        };
        check(
            held.is_ok() && breach_count[i] == 0,
            format!(
                "gpu{i}: assert_host_invariants fails: {} requests arrived to more than {SLOTS} \
                 in flight or to another model (details above); the helper says: {first}",
                breach_count[i]
            ),
        );
    }
    // No slot leaked: every host's `active` is back to 0 (panics after 5 s otherwise).
    fleet.assert_all_slots_return(Duration::from_secs(5)).await;
    let rss_checked = rss_kib();

    // ---- memory once everything is gone ---------------------------------------------------
    drop((outcomes, plans, latencies, unexpected, records, status));
    fleet.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after_drop = rss_kib();
    println!(
        "  RSS after the checks (host records copied out) {}, after dropping everything {} \
         (before the run {}, at the end {}); peak RSS {}",
        mib(rss_checked),
        mib(rss_after_drop),
        mib(rss_before),
        mib(rss_end),
        mib(proc_kib("VmHWM"))
    );

    assert!(
        failures.is_empty(),
        "soak failed (seed {seed}, replay with SOAK_SEED={seed}):\n  {}",
        failures.join("\n  ")
    );
}
