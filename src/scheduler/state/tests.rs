//! Deterministic tests of the placement rules and invariants, driven event by event.

use std::cell::Cell;
use std::rc::Rc;

use super::*;

#[derive(Debug)]
struct T {
    id: u64,
    model: String,
    at: Instant,
    deadline: Option<Instant>,
    attempts: u32,
    position: Rc<Cell<usize>>,
}

impl Queueable for T {
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
        self.deadline
    }
    fn attempts(&self) -> u32 {
        self.attempts
    }
    fn abandoned(&self) -> bool {
        false
    }
    fn notify_position(&self, position: usize) {
        self.position.set(position);
    }
}

fn listed(host: usize, models: &[&str]) -> ManifestReport {
    ManifestReport {
        host: HostId(host),
        models: Ok(models.iter().map(|m| m.to_string()).collect()),
        loaded: None,
    }
}

/// A failed read: "HTTP ..." reasons are hosts that answered, others are unreachable.
fn failed(host: usize, why: &str) -> ManifestReport {
    ManifestReport {
        host: HostId(host),
        models: Err(ManifestFailure {
            reason: why.to_string(),
            answered: why.starts_with("HTTP"),
        }),
        loaded: None,
    }
}

fn done() -> Release<T> {
    Release {
        outcome: Outcome::Completed,
        signal: HostSignal::Healthy,
        retry: None,
    }
}

struct Harness {
    state: DispatchState<T>,
    now: Instant,
    next_id: u64,
    /// Per host: (task id, model) of running tasks, from the Start decisions.
    running: Vec<Vec<(u64, String)>>,
    slots: Vec<usize>,
    started: Vec<(u64, HostId, Instant)>,
    failed: Vec<(u64, DispatchError)>,
    manifest_reads: usize,
    probes: Vec<HostId>,
    health: Vec<(HostId, HealthChange)>,
}

impl Harness {
    /// `hosts`: (slots, models). All workers start idle and manifests are read at once.
    fn new(hosts: &[(usize, &[&str])], max_bypass: Duration) -> Self {
        let mut h = Self::unread(hosts, max_bypass);
        let reports = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, models))| listed(i, models))
            .collect();
        let d = h.state.manifests_read(reports, h.now);
        h.apply(d);
        h
    }

    fn unread(hosts: &[(usize, &[&str])], max_bypass: Duration) -> Self {
        let limits = Limits {
            max_pending: 100_000,
            max_bypass,
            ..Limits::default()
        };
        let state = DispatchState::new(
            hosts
                .iter()
                .enumerate()
                .map(|(i, (slots, _))| (format!("h{i}"), *slots)),
            limits,
        );
        let mut h = Harness {
            state,
            now: Instant::now(),
            next_id: 0,
            running: vec![Vec::new(); hosts.len()],
            slots: hosts.iter().map(|(s, _)| *s).collect(),
            started: Vec::new(),
            failed: Vec::new(),
            manifest_reads: 0,
            probes: Vec::new(),
            health: Vec::new(),
        };
        let d = h.state.start();
        h.apply(d);
        for (i, (slots, _)) in hosts.iter().enumerate() {
            for _ in 0..*slots {
                let d = h.state.worker_idle(HostId(i), h.now);
                h.apply(d);
            }
        }
        h
    }

    fn task(&mut self, model: &str) -> T {
        self.next_id += 1;
        T {
            id: self.next_id,
            model: model.into(),
            at: self.now,
            deadline: None,
            attempts: 0,
            position: Rc::new(Cell::new(0)),
        }
    }

    fn submit(&mut self, model: &str) -> u64 {
        let t = self.task(model);
        let id = t.id;
        let d = self.state.submit(t, self.now);
        self.apply(d);
        id
    }

    fn apply(&mut self, decisions: Vec<Decision<T>>) {
        for d in decisions {
            match d {
                Decision::Start { task, host } => {
                    let on = &mut self.running[host.0];
                    assert!(
                        on.len() < self.slots[host.0],
                        "slot bound broken on {host:?}"
                    );
                    assert!(
                        on.iter().all(|(_, m)| *m == task.model),
                        "two models at once on {host:?}: {on:?} + {}",
                        task.model
                    );
                    on.push((task.id, task.model.clone()));
                    self.started.push((task.id, host, self.now));
                }
                Decision::Fail { task, error } => self.failed.push((task.id, error)),
                Decision::ReadManifests => self.manifest_reads += 1,
                Decision::Probe { host, .. } => self.probes.push(host),
                Decision::Health { host, change } => self.health.push((host, change)),
            }
            self.assert_work_conserving();
        }
    }

    /// Finishes a running task; its worker goes idle again right after.
    fn finish(&mut self, id: u64) {
        let host = self
            .running
            .iter()
            .position(|r| r.iter().any(|(t, _)| *t == id))
            .expect("task is running");
        self.running[host].retain(|(t, _)| *t != id);
        let d = self.state.released(HostId(host), done(), self.now);
        self.apply(d);
        let d = self.state.worker_idle(HostId(host), self.now);
        self.apply(d);
    }

    fn host_of(&self, id: u64) -> Option<usize> {
        self.started
            .iter()
            .find(|(t, _, _)| *t == id)
            .map(|(_, h, _)| h.0)
    }

    fn assert_work_conserving(&self) {
        let held = self.state.held_for_drain(self.now);
        for (model, queue) in &self.state.queues {
            if !queue.is_empty() {
                assert!(
                    self.state.pick_host(model, &held).is_none(),
                    "a task of {model} waits while an idle slot could run it"
                );
            }
        }
    }
}

const LONG: Duration = Duration::from_secs(3600);

#[test]
fn seed_race_two_requests_two_hosts_one_each() {
    let mut h = Harness::new(&[(1, &["a"]), (1, &["a"])], LONG);
    let x = h.submit("a");
    let y = h.submit("a");
    assert_eq!(h.host_of(x), Some(0));
    assert_eq!(
        h.host_of(y),
        Some(1),
        "the second request must not pile onto host 0"
    );
}

#[test]
fn no_head_of_line_blocking_across_models() {
    let mut h = Harness::new(&[(1, &["a"]), (1, &["b"])], LONG);
    let a1 = h.submit("a");
    let a2 = h.submit("a");
    let b = h.submit("b");
    assert_eq!(h.host_of(a1), Some(0));
    assert_eq!(h.host_of(a2), None, "a2 waits for host 0");
    assert_eq!(h.host_of(b), Some(1), "b runs while a2 waits");
    h.finish(a1);
    assert_eq!(h.host_of(a2), Some(0));
}

#[test]
fn drain_guard_does_not_starve_the_other_model() {
    // Two slots, a steady stream of a: without a hold, the host never drains for b.
    let mut h = Harness::new(&[(2, &["a", "b"])], Duration::from_secs(5));
    let mut running = vec![h.submit("a"), h.submit("a")];
    let b = h.submit("b");
    for step in 0..20 {
        h.now += Duration::from_secs(1);
        let next = h.submit("a");
        let done = running.remove(0);
        h.finish(done);
        if h.host_of(b).is_some() {
            assert!(step >= 4, "b overtook the rule before it was overdue");
            return;
        }
        if h.host_of(next).is_some() {
            running.push(next);
        }
        if running.is_empty() {
            break;
        }
    }
    assert!(
        h.host_of(b).is_some(),
        "b starved behind a steady stream of a"
    );
}

#[test]
fn drain_guard_lets_same_model_share_and_blocks_others() {
    let mut h = Harness::new(&[(2, &["a", "b"])], LONG);
    let a1 = h.submit("a");
    let a2 = h.submit("a");
    assert_eq!(h.host_of(a2), Some(0), "same model shares the host's slots");
    let b = h.submit("b");
    assert_eq!(h.host_of(b), None);
    h.finish(a1);
    assert_eq!(h.host_of(b), None, "one a still streams");
    h.finish(a2);
    assert_eq!(h.host_of(b), Some(0), "drained host takes b");
    assert_eq!(
        h.state.snapshot().hosts[0].current_model.as_deref(),
        Some("b")
    );
}

#[test]
fn least_versatile_idle_host_gets_the_task() {
    let mut h = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], LONG);
    let a = h.submit("a");
    assert_eq!(h.host_of(a), Some(1), "keep the versatile host free");
    let b = h.submit("b");
    assert_eq!(h.host_of(b), Some(0));
}

#[test]
fn freed_slot_takes_the_scarcest_model_first() {
    let mut h = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], LONG);
    let busy0 = h.submit("b");
    let busy1 = h.submit("a");
    let a_old = h.submit("a");
    let b_new = h.submit("b");
    h.finish(busy0);
    assert_eq!(h.host_of(b_new), Some(0), "only host 0 can run b");
    assert_eq!(h.host_of(a_old), None);
    h.finish(busy1);
    assert_eq!(h.host_of(a_old), Some(1));
}

/// Discrete-event run of a battery with unit durations; returns the makespan in units.
fn makespan(h: &mut Harness, battery: &[&str]) -> u64 {
    let ids: Vec<u64> = battery.iter().map(|m| h.submit(m)).collect();
    let mut t = 0;
    let mut done = 0;
    while done < ids.len() {
        t += 1;
        h.now += Duration::from_secs(1);
        let running: Vec<u64> = h.running.iter().flatten().map(|(id, _)| *id).collect();
        assert!(!running.is_empty(), "nothing runs while work waits");
        for id in running {
            h.finish(id);
            done += 1;
        }
    }
    t
}

#[test]
fn battery_20a_10b_meets_the_ideal_makespan() {
    let battery: Vec<&str> = std::iter::repeat_n("a", 20)
        .chain(std::iter::repeat_n("b", 10))
        .collect();
    let mut placed = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], LONG);
    assert_eq!(
        makespan(&mut placed, &battery),
        15,
        "30 units of work on 2 hosts"
    );

    // max_bypass = 0 makes every task overdue: plain FIFO, the upstream behaviour.
    let mut fifo = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], Duration::ZERO);
    assert_eq!(
        makespan(&mut fifo, &battery),
        20,
        "FIFO leaves the only b host busy with a"
    );
}

#[test]
fn a_task_past_max_bypass_is_not_passed_over_again() {
    let mut h = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], Duration::from_secs(5));
    let long_a = h.submit("a"); // occupies host 1 for the whole test
    assert_eq!(h.host_of(long_a), Some(1));
    let first_b = h.submit("b");
    let waiting_a = h.submit("a");
    let more_b: Vec<u64> = (0..10).map(|_| h.submit("b")).collect();
    // Before the bypass limit, host 0 prefers b (only it can run b).
    let mut current = first_b;
    for (step, b) in more_b.iter().enumerate() {
        h.now += Duration::from_secs(1);
        h.finish(current);
        if h.host_of(waiting_a).is_some() {
            assert!(step >= 4, "a ran before it was overdue (step {step})");
            break;
        }
        assert_eq!(h.host_of(*b), Some(0));
        current = *b;
    }
    assert_eq!(
        h.host_of(waiting_a),
        Some(0),
        "the overdue a goes first on the next free slot"
    );
    let (_, _, at) = h.started.iter().find(|(t, _, _)| *t == waiting_a).unwrap();
    let enq = h.started.iter().find(|(t, _, _)| *t == long_a).unwrap().2;
    assert!(at.duration_since(enq) >= Duration::from_secs(5));
    assert!(
        at.duration_since(enq) < Duration::from_secs(7),
        "at most one more b after the limit"
    );
}

#[test]
fn tasks_before_the_first_manifest_read_wait_for_it() {
    let mut h = Harness::unread(&[(1, &["a"]), (1, &["b"])], LONG);
    assert_eq!(h.manifest_reads, 1, "the first read starts at once");
    let a = h.submit("a");
    let z = h.submit("zzz");
    assert_eq!(
        h.manifest_reads, 1,
        "single flight: no second read while one runs"
    );
    assert_eq!(h.host_of(a), None);
    let d = h
        .state
        .manifests_read(vec![listed(0, &["a"]), failed(1, "HTTP 401")], h.now);
    h.apply(d);
    assert_eq!(h.host_of(a), Some(0));
    assert!(
        h.failed.is_empty(),
        "the first read began before zzz arrived: it gets one more"
    );
    assert_eq!(h.manifest_reads, 2);
    let d = h
        .state
        .manifests_read(vec![listed(0, &["a"]), failed(1, "HTTP 401")], h.now);
    h.apply(d);
    let (id, err) = &h.failed[0];
    assert_eq!(*id, z);
    assert_eq!(err.kind, ErrorKind::ModelNotAvailable);
    assert!(
        err.message
            .contains("Model 'zzz' not available on any server"),
        "{}",
        err.message
    );
    assert!(err.message.contains("h1: HTTP 401"), "{}", err.message);
}

#[test]
fn unknown_model_triggers_one_coalesced_reread() {
    let mut h = Harness::new(&[(1, &["a"])], LONG);
    let reads = h.manifest_reads;
    let ids: Vec<u64> = (0..50).map(|_| h.submit("b")).collect();
    assert_eq!(h.manifest_reads, reads + 1, "50 requests, one re-read");
    let d = h.state.manifests_read(vec![listed(0, &["a", "b"])], h.now);
    h.apply(d);
    assert_eq!(
        h.host_of(ids[0]),
        Some(0),
        "the model appeared: the task runs"
    );
    assert!(h.failed.is_empty());
}

#[test]
fn no_models_anywhere_names_each_hosts_error() {
    // Both hosts answered with errors: nothing will come back by itself, fail fast.
    let mut h = Harness::unread(&[(1, &[]), (1, &[])], LONG);
    let d = h
        .state
        .manifests_read(vec![failed(0, "HTTP 500"), failed(1, "HTTP 401")], h.now);
    h.apply(d);
    let x = h.submit("a");
    assert_eq!(h.manifest_reads, 2, "one coalesced re-read");
    let d = h
        .state
        .manifests_read(vec![failed(0, "HTTP 500"), failed(1, "HTTP 401")], h.now);
    h.apply(d);
    let (id, err) = &h.failed[0];
    assert_eq!(*id, x);
    assert_eq!(err.kind, ErrorKind::NoModelsAvailable);
    assert!(
        err.message
            .starts_with("No models available from any server (")
    );
    assert!(err.message.contains("h0: HTTP 500") && err.message.contains("h1: HTTP 401"));
    assert!(!err.retryable);
}

#[test]
fn a_host_unreachable_since_start_is_waited_for() {
    let mut h = Harness::unread(&[(1, &[]), (1, &[])], LONG);
    let d = h.state.manifests_read(
        vec![failed(0, "connection refused"), failed(1, "HTTP 401")],
        h.now,
    );
    h.apply(d);
    assert_eq!(h.probes, vec![HostId(0), HostId(1)], "both are probed");
    let x = h.submit("a");
    assert!(h.failed.is_empty(), "h0 may have it: wait for it");
    h.now += Duration::from_secs(29);
    let d = h.state.tick(h.now);
    h.apply(d);
    assert!(h.failed.is_empty());
    assert_eq!(
        h.state.next_deadline(),
        Some(h.now + Duration::from_secs(1))
    );
    h.now += Duration::from_secs(1);
    let d = h.state.tick(h.now);
    h.apply(d);
    let (id, err) = &h.failed[0];
    assert_eq!(*id, x);
    assert_eq!(err.kind, ErrorKind::NoModelsAvailable);
    assert!(
        err.message.contains("h0: connection refused") && err.message.contains("host_wait_seconds")
    );
    assert!(err.retryable, "a host may come back");
}

#[test]
fn cancel_removes_a_waiting_task_and_keeps_slots_balanced() {
    let mut h = Harness::new(&[(1, &["a"])], LONG);
    let a1 = h.submit("a");
    let a2 = h.submit("a");
    let a3 = h.submit("a");
    assert!(h.state.cancel(TaskId(a2)).is_some());
    assert!(
        h.state.cancel(TaskId(a2)).is_none(),
        "cancelling twice is a no-op"
    );
    assert!(
        h.state.cancel(TaskId(a1)).is_none(),
        "a running task is not in the queue"
    );
    h.finish(a1);
    assert_eq!(h.host_of(a3), Some(0));
    assert_eq!(h.host_of(a2), None);
    h.finish(a3);
    let snap = h.state.snapshot();
    assert_eq!(snap.hosts[0].active, 0);
    assert!(snap.queue.is_empty());
    assert_eq!(snap.counters.cancelled, 1);
}

#[test]
fn queue_full_is_refused_at_once() {
    let mut h = Harness::new(&[(1, &["a"])], LONG);
    h.state.limits.max_pending = 2;
    h.submit("a"); // runs
    h.submit("a");
    h.submit("a");
    let x = h.submit("a");
    let (id, err) = h.failed.last().unwrap();
    assert_eq!(*id, x);
    assert_eq!(err.kind, ErrorKind::QueueFull);
    assert!(err.retryable && err.message.contains("queue full (2 pending)"));
}

#[test]
fn queue_deadline_fails_with_timeout_and_keeps_the_slot() {
    let mut h = Harness::new(&[(1, &["a"])], LONG);
    let a1 = h.submit("a");
    let mut t = h.task("a");
    t.deadline = Some(h.now + Duration::from_secs(2));
    let a2 = t.id;
    let d = h.state.submit(t, h.now);
    h.apply(d);
    assert_eq!(
        h.state.next_deadline(),
        Some(h.now + Duration::from_secs(2))
    );
    h.now += Duration::from_secs(3);
    let d = h.state.tick(h.now);
    h.apply(d);
    let (id, err) = &h.failed[0];
    assert_eq!(*id, a2);
    assert!(err.message.contains("timeout") && err.retryable);
    assert_eq!(
        h.state.snapshot().hosts[0].active,
        1,
        "a1 still holds its slot"
    );
    assert_eq!(h.state.next_deadline(), None);
    h.finish(a1);
}

#[test]
fn queue_position_is_reported_and_moves_up() {
    let mut h = Harness::new(&[(1, &["a"])], LONG);
    let a1 = h.submit("a");
    let t2 = h.task("a");
    let p2 = t2.position.clone();
    let d = h.state.submit(t2, h.now);
    h.apply(d);
    let t3 = h.task("a");
    let p3 = t3.position.clone();
    let d = h.state.submit(t3, h.now);
    h.apply(d);
    assert_eq!((p2.get(), p3.get()), (1, 2));
    h.finish(a1);
    assert_eq!(p3.get(), 1);
}

/// A small xorshift generator: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_workloads_keep_every_invariant() {
    let models = ["a", "b", "c", "d"];
    for seed in 1..=200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let host_count = 1 + rng.below(4) as usize;
        let hosts: Vec<(usize, Vec<&str>)> = (0..host_count)
            .map(|_| {
                let slots = 1 + rng.below(3) as usize;
                let listed: Vec<&str> = models
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                (slots, listed)
            })
            .collect();
        let spec: Vec<(usize, &[&str])> = hosts.iter().map(|(s, m)| (*s, m.as_slice())).collect();
        let bypass = Duration::from_secs(rng.below(5));
        let mut h = Harness::new(&spec, bypass);
        let mut submitted = Vec::new();
        for _ in 0..300 {
            match rng.below(4) {
                0 | 1 => {
                    let m = models[rng.below(4) as usize];
                    if h.state.coverage.contains_key(m) {
                        submitted.push(h.submit(m));
                    }
                }
                2 => {
                    let running: Vec<u64> = h.running.iter().flatten().map(|(id, _)| *id).collect();
                    if !running.is_empty() {
                        h.finish(running[rng.below(running.len() as u64) as usize]);
                    }
                }
                _ => {
                    if !submitted.is_empty() {
                        let id = submitted[rng.below(submitted.len() as u64) as usize];
                        h.state.cancel(TaskId(id));
                    }
                }
            }
            h.now += Duration::from_millis(rng.below(1500));
        }
        // Drain: everything submitted and not cancelled finishes.
        loop {
            let running: Vec<u64> = h.running.iter().flatten().map(|(id, _)| *id).collect();
            if running.is_empty() {
                break;
            }
            for id in running {
                h.finish(id);
            }
        }
        let snap = h.state.snapshot();
        assert!(
            snap.queue.is_empty(),
            "seed {seed}: tasks left waiting: {:?}",
            snap.queue
        );
        assert!(
            snap.hosts
                .iter()
                .all(|x| x.active == 0 && x.current_model.is_none())
        );
        assert_eq!(
            snap.counters.started, snap.counters.completed,
            "seed {seed}: every start released exactly once"
        );
    }
}
