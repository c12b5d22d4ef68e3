//! Deterministic tests of the placement rules and invariants, driven event by event.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
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
    /// The client's cancellation token (the real task's `abandoned()`).
    abandoned: Rc<Cell<bool>>,
    key: Option<fair::QueueKey>,
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
        self.abandoned.get()
    }
    fn notify_position(&self, position: usize, _: Option<Duration>) {
        self.position.set(position);
    }
    fn client_id(&self) -> &str {
        "c"
    }
    fn priority(&self) -> i32 {
        0
    }
    fn queue_key(&self) -> Option<fair::QueueKey> {
        self.key
    }
    fn set_queue_key(&mut self, key: fair::QueueKey) {
        self.key = Some(key);
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
        observed: None,
    }
}

/// How a task ended, as the harness saw it (each task ends exactly once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Failed,
    Cancelled,
}

/// How a worker reports the end of an attempt.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Completed,
    /// A 5xx answer: counts toward the breaker.
    ServerError,
    /// A 4xx or a bad stream: says nothing about the host.
    Neutral,
    /// The connection broke after the host answered: no retry.
    Unreachable,
    /// The host could not be reached before the first byte: the task goes back to the scheduler.
    UnreachableRetry,
    /// The client cancelled while it ran.
    Cancelled,
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
    /// Per host, the models it lists whenever its manifest is read.
    listing: Vec<Vec<String>>,
    /// Running tasks as their workers hold them (attempts counted at start, as the worker does).
    held: HashMap<u64, T>,
    /// Per host: Start decisions seen and slots given back.
    starts: Vec<usize>,
    releases: Vec<usize>,
    /// Per host: workers that gave their slot back and have not asked for a task yet.
    returning: Vec<usize>,
    /// Every task's end, recorded once.
    ended: HashMap<u64, End>,
    /// How many tasks ended each way: (completed, failed, cancelled).
    tally: (u64, u64, u64),
    /// Submitted tasks that have not ended.
    open: BTreeSet<u64>,
    /// Each task's cancellation flag, as its client holds it.
    abandon: HashMap<u64, Rc<Cell<bool>>>,
    /// Tasks submitted through `submit_task` (the property tests' bookkeeping).
    submitted: Vec<u64>,
    /// `manifests_read` calls made by the harness (answers to `ReadManifests`).
    manifests_answered: usize,
    /// Hosts with a `Probe` decision not answered yet.
    probing: BTreeSet<usize>,
    /// Retried attempts that went back to the queue.
    requeued: u64,
}

impl Harness {
    /// `hosts`: (slots, models). All workers start idle and manifests are read at once.
    fn new(hosts: &[(usize, &[&str])], max_bypass: Duration) -> Self {
        Self::with_limits(hosts, Self::limits(max_bypass))
    }

    fn limits(max_bypass: Duration) -> Limits {
        Limits {
            max_pending: 100_000,
            max_bypass,
            // These tests pin the load-blind rules; swap-aware placement has its own tests,
            // and the property tests run both.
            swap_aware: false,
            ..Limits::default()
        }
    }

    /// Like `new`, with the given limits.
    fn with_limits(hosts: &[(usize, &[&str])], limits: Limits) -> Self {
        let mut h = Self::unread_with_limits(hosts, limits);
        let reports = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, models))| listed(i, models))
            .collect();
        h.manifests_answered += 1;
        let d = h.state.manifests_read(reports, h.now);
        h.apply(d);
        h
    }

    fn unread(hosts: &[(usize, &[&str])], max_bypass: Duration) -> Self {
        Self::unread_with_limits(hosts, Self::limits(max_bypass))
    }

    fn unread_with_limits(hosts: &[(usize, &[&str])], limits: Limits) -> Self {
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
            listing: hosts
                .iter()
                .map(|(_, models)| models.iter().map(|m| m.to_string()).collect())
                .collect(),
            held: HashMap::new(),
            starts: vec![0; hosts.len()],
            releases: vec![0; hosts.len()],
            returning: vec![0; hosts.len()],
            ended: HashMap::new(),
            tally: (0, 0, 0),
            open: BTreeSet::new(),
            abandon: HashMap::new(),
            submitted: Vec::new(),
            manifests_answered: 0,
            probing: BTreeSet::new(),
            requeued: 0,
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
        let abandoned = Rc::new(Cell::new(false));
        self.abandon.insert(self.next_id, abandoned.clone());
        T {
            id: self.next_id,
            model: model.into(),
            at: self.now,
            deadline: None,
            attempts: 0,
            position: Rc::new(Cell::new(0)),
            abandoned,
            key: None,
        }
    }

    /// Submits a task made by `task`, keeping count of it.
    fn submit_task(&mut self, task: T) -> u64 {
        let id = task.id;
        self.submitted.push(id);
        self.open.insert(id);
        let d = self.state.submit(task, self.now);
        self.apply(d);
        id
    }

    fn submit(&mut self, model: &str) -> u64 {
        let t = self.task(model);
        self.submit_task(t)
    }

    /// Carries out the decisions of one event, checking each Start: slot bound, one model
    /// per host, never a task that already ended, and FIFO among equals (within a model, no
    /// task starts while an older one of the same model still waits in the queue).
    fn apply(&mut self, decisions: Vec<Decision<T>>) {
        // Per model, the newest task started by this event so far.
        let mut newest_start: HashMap<String, u64> = HashMap::new();
        for d in decisions {
            match d {
                Decision::Start { mut task, host, .. } => {
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
                    assert!(
                        !self.ended.contains_key(&task.id),
                        "task {} started after it ended",
                        task.id
                    );
                    // Health and listings change before the matching in every event.
                    let state_host = &self.state.hosts[host.0];
                    assert!(
                        state_host.health == Health::Up && state_host.models.contains(&task.model),
                        "task {} of {} started on {host:?}, which is {:?} and lists {:?}",
                        task.id,
                        task.model,
                        state_host.health,
                        state_host.models
                    );
                    assert!(
                        !self.held.contains_key(&task.id),
                        "task {} started twice at once",
                        task.id
                    );
                    // Within one event every enqueue precedes the matching: starts of a model
                    // come oldest first.
                    if let Some(prev) = newest_start.insert(task.model.clone(), task.id) {
                        assert!(
                            prev < task.id,
                            "FIFO broken: task {} of {} started after task {prev}",
                            task.id,
                            task.model
                        );
                    }
                    on.push((task.id, task.model.clone()));
                    self.started.push((task.id, host, self.now));
                    self.starts[host.0] += 1;
                    // The worker counts the attempt when it takes the task.
                    task.attempts += 1;
                    self.held.insert(task.id, task);
                }
                Decision::Fail { task, error } => {
                    self.end(task.id, End::Failed);
                    self.failed.push((task.id, error));
                }
                Decision::ReadManifests => self.manifest_reads += 1,
                Decision::Probe { host, .. } => {
                    assert!(
                        self.probing.insert(host.0),
                        "a second probe of {host:?} while one is outstanding"
                    );
                    self.probes.push(host);
                }
                Decision::Health { host, change } => self.health.push((host, change)),
                // Fleet changes are tested in `fleet_tests`; the harness's fleet is fixed.
                Decision::DismissWorkers { .. } | Decision::ReadSlots { .. } => {}
            }
            self.assert_work_conserving();
        }
        // A task that still waits was waiting when the newer tasks of its model started
        // (tasks enter the queue before the matching, in the same event).
        for (model, newest) in newest_start {
            if let Some((oldest, _)) = self.state.queues.get(&model).and_then(|q| q.oldest()) {
                assert!(
                    oldest.0 > newest,
                    "FIFO broken: task {newest} of {model} started while the older task {} waits",
                    oldest.0
                );
            }
        }
    }

    /// Records how a task ended; a task ends exactly once.
    fn end(&mut self, id: u64, end: End) {
        if let Some(before) = self.ended.insert(id, end) {
            panic!("task {id} ended twice: {before:?}, then {end:?}");
        }
        self.open.remove(&id);
        match end {
            End::Completed => self.tally.0 += 1,
            End::Failed => self.tally.1 += 1,
            End::Cancelled => self.tally.2 += 1,
        }
    }

    /// Finishes a running task; its worker goes idle again right after.
    fn finish(&mut self, id: u64) {
        self.end_attempt(id, Ending::Completed, true);
    }

    /// The worker running `id` gives its slot back, as the real worker does: the lease is
    /// released exactly once, with the task handed back when it failed before the first byte.
    /// With `worker_back`, the worker asks for its next task at once; otherwise later
    /// (`worker_back`).
    fn end_attempt(&mut self, id: u64, how: Ending, worker_back: bool) {
        let host = self
            .running
            .iter()
            .position(|r| r.iter().any(|(t, _)| *t == id))
            .expect("task is running");
        assert!(
            self.releases[host] < self.starts[host],
            "more releases than starts on h{host}"
        );
        assert!(
            self.state.hosts[host].active > 0,
            "the state thinks h{host} runs nothing, yet task {id} runs there"
        );
        self.running[host].retain(|(t, _)| *t != id);
        self.releases[host] += 1;
        let task = self
            .held
            .remove(&id)
            .expect("a running task is held by its worker");
        let abandoned = task.abandoned.get();
        let attempts = task.attempts;
        let (outcome, signal) = match how {
            Ending::Completed => {
                let Release {
                    outcome, signal, ..
                } = done();
                (outcome, signal)
            }
            Ending::ServerError => (Outcome::Failed, HostSignal::ServerError("HTTP 500".into())),
            Ending::Neutral => (Outcome::Failed, HostSignal::Neutral),
            Ending::Unreachable | Ending::UnreachableRetry => (
                Outcome::Failed,
                HostSignal::Unreachable("connection reset".into()),
            ),
            Ending::Cancelled => (Outcome::Cancelled, HostSignal::Neutral),
        };
        let retry = matches!(how, Ending::UnreachableRetry);
        let release = if retry {
            let error = DispatchError::new(ErrorKind::Connection, "connection refused");
            Release {
                outcome,
                signal,
                retry: Some((task, error)),
                observed: None,
            }
        } else {
            self.end(
                id,
                match outcome {
                    Outcome::Completed => End::Completed,
                    Outcome::Failed => End::Failed,
                    Outcome::Cancelled => End::Cancelled,
                },
            );
            Release {
                outcome,
                signal,
                retry: None,
                observed: None,
            }
        };
        let d = self.state.released(HostId(host), release, self.now);
        let failed_now = d
            .iter()
            .any(|x| matches!(x, Decision::Fail { task, .. } if task.id == id));
        let started_now = d
            .iter()
            .any(|x| matches!(x, Decision::Start { task, .. } if task.id == id));
        self.apply(d);
        if retry {
            let queued = self.state.index.contains_key(&TaskId(id));
            if abandoned {
                assert!(
                    !failed_now && !started_now && !queued,
                    "task {id} was cancelled: no retry, no failure to report"
                );
                self.end(id, End::Cancelled);
            } else if attempts < self.state.limits.max_attempts {
                assert!(
                    !failed_now && (started_now || queued),
                    "task {id} failed before the first byte after {attempts} attempt(s): it \
                     goes back to the queue"
                );
                self.requeued += 1;
            } else {
                assert!(
                    failed_now,
                    "task {id} is out of attempts ({attempts}): it fails"
                );
            }
        }
        if worker_back {
            let d = self.state.worker_idle(HostId(host), self.now);
            self.apply(d);
        } else {
            self.returning[host] += 1;
        }
    }

    /// A worker that gave its slot back asks for its next task.
    fn worker_back(&mut self, host: usize) {
        assert!(self.returning[host] > 0);
        self.returning[host] -= 1;
        let d = self.state.worker_idle(HostId(host), self.now);
        self.apply(d);
    }

    /// The client cancels `id`: the scheduler drops it if it waits, else its worker stops it.
    /// Returns whether it runs (its worker has yet to give the slot back).
    fn cancel(&mut self, id: u64) -> bool {
        self.abandon[&id].set(true);
        let (cancelled, decisions) = self.state.cancel(TaskId(id), self.now);
        self.apply(decisions);
        match cancelled {
            Some(task) => {
                assert_eq!(task.id, id);
                assert!(!self.held.contains_key(&id), "task {id} runs and waits");
                self.end(id, End::Cancelled);
                false
            }
            None => {
                let running = self.held.contains_key(&id);
                assert!(
                    running || self.ended.contains_key(&id),
                    "cancel found task {id} nowhere: it neither waits, runs nor ended"
                );
                running
            }
        }
    }

    /// A manifest read (starting one if none runs, as the periodic refresh does) that finds
    /// every host listing its models, except `failing` (host, reason).
    fn read_manifests(&mut self, failing: Option<(usize, &str)>) {
        if self.manifest_reads == self.manifests_answered {
            let mut d = Vec::new();
            self.state.request_manifests(&mut d);
            self.apply(d);
        }
        let reports = (0..self.listing.len())
            .map(|i| match failing {
                Some((f, why)) if f == i => failed(i, why),
                _ => ManifestReport {
                    host: HostId(i),
                    models: Ok(self.listing[i].clone()),
                    loaded: None,
                },
            })
            .collect();
        self.manifests_answered += 1;
        let d = self.state.manifests_read(reports, self.now);
        self.apply(d);
    }

    /// Answers the outstanding probe of `host`: it lists its models, or is still unreachable.
    fn answer_probe(&mut self, host: usize, ok: bool) {
        assert!(self.probing.remove(&host), "h{host} was not probed");
        let report = if ok {
            ManifestReport {
                host: HostId(host),
                models: Ok(self.listing[host].clone()),
                loaded: None,
            }
        } else {
            failed(host, "connection refused")
        };
        let d = self.state.probe_result(report, self.now);
        self.apply(d);
    }

    fn running_ids(&self) -> Vec<u64> {
        self.running.iter().flatten().map(|(id, _)| *id).collect()
    }

    /// The invariants that hold between any two events (for harnesses driven only through
    /// `submit_task`, `end_attempt`, `cancel`, `read_manifests` and `answer_probe`).
    fn check_step(&self) {
        self.assert_work_conserving();
        let s = &self.state;
        for (i, host) in s.hosts.iter().enumerate() {
            let on = &self.running[i];
            assert_eq!(
                host.active,
                on.len(),
                "h{i}: the state counts {} running, the workers hold {on:?}",
                host.active
            );
            assert!(host.active <= host.slots, "h{i}: slot bound");
            assert_eq!(
                host.current_model.as_deref(),
                on.first().map(|(_, m)| m.as_str()),
                "h{i}: the drain guard's model is not the running one"
            );
            assert_eq!(
                self.starts[i],
                self.releases[i] + on.len(),
                "h{i}: every start is released exactly once"
            );
            assert_eq!(
                host.active + host.idle_workers + self.returning[i],
                host.slots,
                "h{i}: the state's idle workers"
            );
            if host.health == Health::Down {
                assert!(
                    self.probing.contains(&i),
                    "h{i} is down and nothing probes it: it never comes back"
                );
            }
        }
        let pending_reads = self.manifest_reads - self.manifests_answered;
        assert!(pending_reads <= 1, "manifest reads are single-flight");
        assert_eq!(s.reading_manifests, pending_reads == 1);
        let queued: usize = s.queues.values().map(|q| q.len()).sum();
        assert_eq!(s.waiting, queued, "the waiting count drifted");
        assert_eq!(s.index.len(), queued, "the index drifted from the queues");
        let with_deadline = s
            .queues
            .values()
            .flat_map(|q| q.values())
            .filter(|t| t.deadline.is_some())
            .count();
        assert!(
            s.deadlines.len() == with_deadline
                && s.deadlines.iter().all(|(at, id)| s
                    .index
                    .get(id)
                    .and_then(|m| s.queues[m].get(*id))
                    .is_some_and(|t| t.deadline == Some(*at))),
            "the deadlines drifted from the queued tasks"
        );

        let c = s.snapshot().counters;
        assert!(
            c.completed + c.failed + c.cancelled <= c.submitted,
            "more tasks ended than were submitted: {c:?}"
        );
        assert_eq!(c.submitted, self.submitted.len() as u64);
        assert_eq!(c.started, self.starts.iter().sum::<usize>() as u64);
        assert_eq!(
            (c.completed, c.failed, c.cancelled),
            self.tally,
            "counters vs the ends seen (completed, failed, cancelled)"
        );
        assert_eq!(c.retried, self.requeued);

        // Every task that has not ended is in exactly one place, and nothing else is in any:
        // queued, awaiting a manifest, or running.
        assert_eq!(
            s.index.len() + s.parked.len() + s.parked_next.len() + self.held.len(),
            self.open.len(),
            "tasks lost or duplicated"
        );
        for id in &self.open {
            let places = [
                s.index.contains_key(&TaskId(*id)),
                s.parked.iter().chain(&s.parked_next).any(|t| t.id == *id),
                self.held.contains_key(id),
            ];
            assert_eq!(
                places.iter().filter(|p| **p).count(),
                1,
                "task {id} is in {places:?} (queued, awaiting a manifest, running)"
            );
        }
    }

    fn host_of(&self, id: u64) -> Option<usize> {
        self.started
            .iter()
            .find(|(t, _, _)| *t == id)
            .map(|(_, h, _)| h.0)
    }

    /// Load-blind: no task waits while an idle slot could run it. Swap-aware (invariant 3 as
    /// the README restates it): no task waits while an idle slot could run it without a load,
    /// and a task nobody holds waits only while every slot that could load it is held back by
    /// the placement rule (checked in `placement`'s own tests and the load battery tests).
    fn assert_work_conserving(&self) {
        let held = self.state.held_for_drain(self.now);
        for (model, queue) in &self.state.queues {
            if queue.is_empty() {
                continue;
            }
            if self.state.limits.swap_aware {
                // Judged at the state's last event: an untimely tick is the actor's job
                // (`next_deadline` wakes it when a held-back task becomes overdue).
                let seen = self.state.last_dispatch.unwrap_or(self.now);
                let held = self.state.held_for_drain(seen);
                let warm_idle = self.state.hosts.iter().enumerate().any(|(i, h)| {
                    !held[i] && h.can_take(model) && h.resident.iter().any(|m| m == model)
                });
                assert!(
                    !warm_idle,
                    "a task of {model} waits while an idle slot holding it could run it"
                );
                assert!(
                    self.state.choose_swap_aware(&held, seen).is_none(),
                    "dispatch stopped while placement still had a pair to start"
                );
            } else {
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
fn a_backlog_in_service_does_not_age_into_fifo() {
    // Every task waits far longer than max_bypass, but each model keeps getting slots: no
    // model is passed over, so the placement rule still decides (30 units on 2 hosts = 15).
    // Aging from arrival alone made this battery FIFO (20) once it ran past max_bypass.
    let battery: Vec<&str> = std::iter::repeat_n("a", 20)
        .chain(std::iter::repeat_n("b", 10))
        .collect();
    let mut h = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], Duration::from_secs(2));
    assert_eq!(makespan(&mut h, &battery), 15);
}

#[test]
fn a_model_with_no_start_for_max_bypass_goes_first() {
    // Host 0 alone serves b and prefers it; a's backlog also runs on host 1, but host 1 is
    // busy for good. Once a has had no start for max_bypass, its next task takes host 0.
    let mut h = Harness::new(&[(1, &["a", "b"]), (1, &["a"])], Duration::from_secs(3));
    let blocker = h.submit("a");
    assert_eq!(h.host_of(blocker), Some(1));
    h.submit("b");
    let waiting: Vec<u64> = (0..3).map(|_| h.submit("a")).collect();
    for _ in 0..20 {
        h.submit("b");
    }
    let mut a_starts = Vec::new();
    for second in 1..=16 {
        h.now += Duration::from_secs(1);
        let (done, _) = h.running[0][0].clone();
        h.finish(done);
        let (next, _) = &h.running[0][0];
        if waiting.contains(next) {
            a_starts.push(second);
        }
    }
    assert_eq!(a_starts.len(), 3, "every waiting a ran: {a_starts:?}");
    assert_eq!(
        a_starts[0], 3,
        "the first a goes once it has waited max_bypass"
    );
    for pair in a_starts.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            3,
            "the next a goes max_bypass after a's last start: {a_starts:?}"
        );
    }
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
    assert!(h.state.cancel(TaskId(a2), h.now).0.is_some());
    assert!(
        h.state.cancel(TaskId(a2), h.now).0.is_none(),
        "cancelling twice is a no-op"
    );
    assert!(
        h.state.cancel(TaskId(a1), h.now).0.is_none(),
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
                        let (_, d) = h.state.cancel(TaskId(id), h.now);
                        h.apply(d);
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

/// One seed of `property_random_faults_and_recoveries_keep_every_invariant`; `log` gets one
/// line per event, for the report when an invariant breaks.
fn random_faults(seed: u64, log: &mut Vec<String>) {
    let models = ["a", "b", "c", "d"];
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
    let limits = Limits {
        max_pending: 100_000,
        max_bypass: Duration::from_secs(rng.below(6)),
        max_attempts: 1 + rng.below(3) as u32,
        host_wait: Duration::from_millis(500 + rng.below(4500)),
        probe_interval: Duration::from_secs(1),
        breaker_threshold: 1 + rng.below(3) as u32,
        breaker_cooldown: Duration::from_millis(500 + rng.below(3500)),
        swap_aware: rng.below(2) == 0,
    };
    log.push(format!("hosts (slots, models): {hosts:?}"));
    log.push(format!("{limits:?}"));
    let mut h = Harness::with_limits(&spec, limits);
    let t0 = h.now;
    h.check_step();
    for step in 0..400 {
        let at = format!("{step:3} t={:5.1}s", (h.now - t0).as_secs_f64());
        match rng.below(100) {
            // A task arrives, sometimes for a model no host lists, sometimes with a deadline.
            0..30 => {
                let model = ["a", "b", "c", "d", "z"][rng.below(5) as usize];
                let mut t = h.task(model);
                if rng.below(3) == 0 {
                    t.deadline = Some(h.now + Duration::from_millis(rng.below(4000)));
                }
                let deadline = t.deadline.map(|d| (d - t0).as_secs_f64());
                let id = h.submit_task(t);
                log.push(format!("{at}: submit #{id} {model}, deadline {deadline:?}"));
            }
            // A running task ends.
            30..55 => {
                let running = h.running_ids();
                if running.is_empty() {
                    continue;
                }
                let id = running[rng.below(running.len() as u64) as usize];
                let how = match rng.below(10) {
                    0..4 => Ending::Completed,
                    4..6 => Ending::ServerError,
                    6 => Ending::Neutral,
                    7 => Ending::Unreachable,
                    _ => Ending::UnreachableRetry,
                };
                let back = rng.below(5) != 0;
                log.push(format!(
                    "{at}: #{id} ends {how:?}, worker back at once: {back}"
                ));
                h.end_attempt(id, how, back);
            }
            // A manifest read finds one host failing (the others list their models).
            55..60 => {
                let host = rng.below(host_count as u64) as usize;
                let why = if rng.below(2) == 0 {
                    "connection refused"
                } else {
                    "HTTP 500"
                };
                log.push(format!("{at}: manifest read, h{host} fails: {why}"));
                h.read_manifests(Some((host, why)));
            }
            // A probe answers: the host is back, or still unreachable.
            60..68 => {
                let probing: Vec<usize> = h.probing.iter().copied().collect();
                if probing.is_empty() {
                    continue;
                }
                let host = probing[rng.below(probing.len() as u64) as usize];
                let ok = rng.below(4) != 0;
                log.push(format!("{at}: probe of h{host} answers, ok: {ok}"));
                h.answer_probe(host, ok);
            }
            // A client cancels; a running task's worker stops it (at once, or a little later:
            // its attempt may end otherwise first).
            68..76 => {
                if h.submitted.is_empty() {
                    continue;
                }
                let id = h.submitted[rng.below(h.submitted.len() as u64) as usize];
                let running = h.cancel(id);
                let stop = running && rng.below(4) != 0;
                log.push(format!(
                    "{at}: cancel #{id} (running: {running}, worker stops it now: {stop})"
                ));
                if stop {
                    let back = rng.below(5) != 0;
                    h.end_attempt(id, Ending::Cancelled, back);
                }
            }
            // Time passes; the actor's timer usually fires.
            76..92 => {
                h.now += Duration::from_millis(rng.below(2001));
                let tick = rng.below(5) != 0;
                log.push(format!(
                    "{at}: time passes to t={:.1}s, tick: {tick}",
                    (h.now - t0).as_secs_f64()
                ));
                if tick {
                    let d = h.state.tick(h.now);
                    h.apply(d);
                    if let Some(next) = h.state.next_deadline() {
                        assert!(next > h.now, "tick left work due: the actor would spin");
                    }
                }
            }
            // A worker that gave its slot back asks for its next task.
            92..96 => {
                let back: Vec<usize> = (0..host_count).filter(|i| h.returning[*i] > 0).collect();
                if back.is_empty() {
                    continue;
                }
                let host = back[rng.below(back.len() as u64) as usize];
                log.push(format!("{at}: a worker of h{host} asks for work"));
                h.worker_back(host);
            }
            // The manifest read in flight, if any, finds every host well.
            _ => {
                if h.manifest_reads == h.manifests_answered {
                    continue;
                }
                log.push(format!("{at}: manifest read in flight answers, all listed"));
                h.read_manifests(None);
            }
        }
        h.check_step();
    }

    // Drain: every worker back, every running task done, every read and probe answered with
    // success, time past every deadline and cool-down, until nothing waits or runs.
    log.push("drain".into());
    let mut rounds = 0;
    loop {
        for host in 0..host_count {
            while h.returning[host] > 0 {
                h.worker_back(host);
                h.check_step();
            }
        }
        for id in h.running_ids() {
            h.end_attempt(id, Ending::Completed, true);
            h.check_step();
        }
        if h.manifest_reads > h.manifests_answered {
            h.read_manifests(None);
            h.check_step();
        }
        for host in h.probing.clone() {
            h.answer_probe(host, true);
            h.check_step();
        }
        let s = &h.state;
        let quiet = h.running_ids().is_empty()
            && s.waiting == 0
            && s.parked.is_empty()
            && s.parked_next.is_empty()
            && h.manifest_reads == h.manifests_answered
            && h.probing.is_empty()
            && s.hosts.iter().all(|x| x.health == Health::Up);
        if quiet {
            break;
        }
        rounds += 1;
        assert!(rounds < 1000, "the drain does not converge");
        h.now += Duration::from_secs(1);
        let d = h.state.tick(h.now);
        h.apply(d);
        h.check_step();
    }
    let snap = h.state.snapshot();
    let c = snap.counters;
    assert_eq!(
        c.completed + c.failed + c.cancelled,
        c.submitted,
        "at rest every task ended: {c:?}"
    );
    assert!(snap.queue.is_empty() && snap.awaiting_manifest == 0);
    for (i, x) in snap.hosts.iter().enumerate() {
        assert!(
            x.active == 0 && x.current_model.is_none(),
            "h{i} at rest: {x:?}"
        );
    }
    for id in &h.submitted {
        assert!(h.ended.contains_key(id), "task {id} never ended");
    }
    assert_eq!(h.ended.len(), h.submitted.len());
    assert_eq!(h.starts, h.releases, "every start released exactly once");
}

#[test]
fn property_random_faults_and_recoveries_keep_every_invariant() {
    for seed in 1..=300u64 {
        let mut log = Vec::new();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| random_faults(seed, &mut log))) {
            eprintln!("seed {seed} broke an invariant after:\n{}", log.join("\n"));
            resume_unwind(panic);
        }
    }
}
